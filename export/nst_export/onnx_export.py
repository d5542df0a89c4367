"""Trace :class:`~nst_export.vgg.VGG19Features` to one self-contained ONNX file.

The graph: input ``image`` ``(batch, 3, height, width)`` float32 RGB in [0, 1]; outputs relu1_1, relu2_1,
relu3_1, relu4_1, relu4_2, relu5_1 (see :data:`nst_export.vgg.OUTPUT_LAYERS`); batch, height and width
dynamic; opset :data:`OPSET`. ``metadata_props`` record the weights' source, file and sha256, their native
input contract, the graph's input contract, the output layers and the pooling. Sources: ``torch.onnx.export``
(TorchScript tracer, ``dynamo=False``) and ``onnx.checker.check_model(full_check=True)`` documentation.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import onnx
import torch

from nst_proto.files import atomic_path
from nst_export.vgg import MIN_SIDE_PX, OUTPUT_LAYERS
from nst_export.weights import WeightSet, build_vgg19

OPSET = 17
INPUT_NAME = "image"
INPUT_CONTRACT = {"layout": "NCHW", "dtype": "float32", "channel_order": "RGB", "range": [0.0, 1.0],
                  "min_side_px": MIN_SIDE_PX}
DEFAULT_MODEL_PATH = Path(os.environ.get("NST_MODEL", "models/vgg19_nst.onnx"))


def export_onnx(weights: WeightSet, path: str | os.PathLike, pooling: str = "max",
                trace_side_px: int = 64) -> Path:
    """Write the feature stack carrying ``weights`` to ``path`` atomically: traced in a temporary folder beside
    it, saved to a temporary file there, fsync-ed and renamed over ``path`` (keeping an older file's permission
    bits). Any failure, ``KeyboardInterrupt`` included, leaves an older ``path`` as it was and no temporary
    file or folder behind.

    Args:
        weights: from :func:`nst_export.weights.load_weights`.
        path: the ``.onnx`` file to write; parent folders are created.
        pooling: ``"max"`` or ``"avg"``.
        trace_side_px: side of the dummy image used for tracing (any value >= 16; axes stay dynamic).

    Returns: the path written.
    Raises: onnx.checker.ValidationError if the traced graph fails the full check; OSError when the file
        cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_vgg19(weights, pooling=pooling)
    dummy = torch.rand(1, 3, trace_side_px, trace_side_px)
    dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in OUTPUT_LAYERS})
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        traced = Path(tmp) / "traced.onnx"
        torch.onnx.export(model, (dummy,), str(traced), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_LAYERS), dynamic_axes=dynamic,
                          do_constant_folding=True, export_params=True)
        proto = onnx.load(str(traced))
        metadata = {
            "nst.weights_source": weights.source,
            "nst.weights_file": os.path.basename(weights.path),
            "nst.weights_sha256": weights.sha256,
            "nst.weights_input_contract": json.dumps(weights.contract.as_dict()),
            "nst.input_contract": json.dumps(INPUT_CONTRACT),
            "nst.output_layers": json.dumps(list(OUTPUT_LAYERS)),
            "nst.pooling": pooling,
            "nst.torch_version": torch.__version__,
        }
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "nst_export"
        proto.doc_string = "VGG-19 feature stack (conv1_1..relu5_1) for Gatys et al. neural style transfer"
        onnx.checker.check_model(proto, full_check=True)
        with atomic_path(path) as final:
            onnx.save(proto, str(final))
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}
