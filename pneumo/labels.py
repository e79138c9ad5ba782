"""The two classes, written once: their order gives the label (0 NORMAL, 1 PNEUMONIA)."""

from __future__ import annotations

CLASSES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
LABELS = {str(label): name for label, name in enumerate(CLASSES)}  # as a card records them (JSON keys)
CONFUSION_MATRIX_LAYOUT = f"[[tn, fp], [fn, tp]]: rows = truth ({', '.join(CLASSES)}), columns = prediction"
