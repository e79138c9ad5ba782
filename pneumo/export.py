"""ONNX export of a registered model: the network only, input = the n_features floats.

A 2,541-parameter model runs anywhere; ONNX is how it gets there. The export needs the
optional ``onnx`` package (``pip install 'pneumo[onnx]'``, which also brings onnxruntime to
run it); without it registration skips the export and says so in the card.

    import onnxruntime
    session = onnxruntime.InferenceSession("model.onnx")
    probabilities = session.run(None, {"features": features})[0]   # features: (n, 140) float32

Preprocessing is not in the graph: compute the features with ``pneumo.transform.featurize``
and the card's ``config.transform``, and compare with the card's ``threshold``.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any, Optional

from pneumo.onnx_model import INPUT_NAME, OUTPUT_NAME  # noqa: F401 (the graph's names, re-exported)

if TYPE_CHECKING:
    import torch

OPSET = 17


def onnx_bytes(state_dict: dict[str, torch.Tensor]) -> tuple[Optional[bytes], str]:
    """(model.onnx's bytes, "written") or (None, "skipped: <reason>"). Never raises."""
    try:
        import onnx
    except ImportError:
        return None, "skipped: the onnx package is not installed (pip install 'pneumo[onnx]')"
    import torch  # here, not above: pneumo.registry imports this module on paths that must not load torch

    from pneumo.model import TinyNet
    try:
        model = TinyNet(n_features=state_dict["hidden1.weight"].shape[1])
        model.load_state_dict(state_dict)
        model.eval()
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model,
                (torch.zeros(2, model.hidden1.in_features),),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter: no onnxscript needed, same graph for this model
            )
        data = buffer.getvalue()
        onnx.checker.check_model(onnx.load_from_string(data))
        return data, "written"
    except Exception as error:  # an export problem must not stop a registration
        return None, f"skipped: export failed ({type(error).__name__}: {error})"


def add_onnx(card: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Optional[bytes]:
    """Export, record the outcome in ``card["export"]``, return the bytes or None.

    The registry writes the bytes as model.onnx and records their sha256 in the card's ``files``.
    """
    data, status = onnx_bytes(state_dict)
    card["export"] = {**(card.get("export") or {}), "onnx": status}
    return data
