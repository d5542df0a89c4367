"""The onnxruntime session and the PyTorch replica compute the same features (fp32)."""

import pytest
import torch

from nst_export import OUTPUT_LAYERS
from nst_server.errors import ModelFileError
from nst_server.model import StyleModels


@pytest.mark.parametrize("height,width", [(64, 64), (96, 136)])
def test_session_and_replica_agree(models, height, width):
    """Strict fp32 on the replica's own device: on CUDA, TF32 (which the server allows for fp32 jobs, 3-4e-4
    relative error per layer) is off for the comparison; results are compared on the host."""
    torch.manual_seed(height)
    image = torch.rand(1, 3, height, width, device=models.device)
    session = models.features(image)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            replica = dict(zip(OUTPUT_LAYERS, models.replica(image)))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    for layer in OUTPUT_LAYERS:
        a, b = session[layer].cpu(), replica[layer].cpu()
        assert a.shape == b.shape
        relative = ((a - b).abs().max() / a.abs().max()).item()
        assert relative <= 1e-4, f"{layer} at {height}x{width}: max relative error {relative:.2e}"


def test_replica_weights_come_from_the_onnx_file(models, onnx_path):
    import onnx
    from onnx import numpy_helper
    proto = onnx.load(str(onnx_path))
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert torch.equal(models.replica.conv4_2.weight.cpu(), torch.from_numpy(init["conv4_2.weight"]))
    assert not any(p.requires_grad for p in models.replica.parameters())


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        StyleModels.load(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError):
        StyleModels.load(bad)
