"""A registered version's network run by onnxruntime: scoring without importing torch.

``import torch`` alone takes seconds; onnxruntime loads the same 2,541-parameter network
(``model.onnx``, written at registration and parity-tested against torch) in a few tens of
milliseconds. ``pneumo.predict`` uses it whenever a version has ``model.onnx`` and
onnxruntime is installed, and falls back to torch otherwise.
"""

from __future__ import annotations

import importlib.util

import numpy as np

ONNX_NAME = "model.onnx"
INPUT_NAME = "features"  # the graph's input: n x n_features float32
OUTPUT_NAME = "probability"  # its output: n PNEUMONIA probabilities


class OnnxModel:
    """The network of model.onnx: rows of features in, PNEUMONIA probabilities out."""

    def __init__(self, data: bytes):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # One row or a few hundred: a single thread answers sooner than a pool that must start.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.n_features = int(self.session.get_inputs()[0].shape[1])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(features, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: rows})[0].reshape(-1)


def available() -> bool:
    """Whether onnxruntime is installed (found without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None

