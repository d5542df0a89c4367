"""Export of the VGG-19 feature stack to ONNX: network definition, offline weight loaders, tracer."""

from nst_proto.extras import require_extra

require_extra(("torch", "onnx", "numpy"), "export")

from nst_export.onnx_export import DEFAULT_MODEL_PATH, OPSET, export_onnx, read_metadata  # noqa: E402
from nst_export.vgg import LAYER_STRIDE, MIN_SIDE_PX, OUTPUT_LAYERS, VGG19Features  # noqa: E402
from nst_export.weights import WeightSet, WeightsNotFoundError, build_vgg19, load_weights  # noqa: E402

__all__ = [
    "DEFAULT_MODEL_PATH", "LAYER_STRIDE", "MIN_SIDE_PX", "OPSET", "OUTPUT_LAYERS", "VGG19Features",
    "WeightSet", "WeightsNotFoundError", "build_vgg19", "export_onnx", "load_weights", "read_metadata",
]
