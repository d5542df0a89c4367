"""The onnxruntime side of StyleModels: IO binding against plain runs, TensorRT provider options."""

from __future__ import annotations

import pytest
import torch

from nst_export.vgg import OUTPUT_LAYERS
from nst_server import model


@pytest.mark.parametrize("shape", [(1, 3, 48, 64), (2, 3, 37, 53)])
def test_io_binding_gives_the_plain_runs_outputs(models, shape, monkeypatch):
    image = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(model, "IO_BINDING", False)
    plain = models.features(image)
    monkeypatch.setattr(model, "IO_BINDING", True)
    bound = models.features(image.contiguous(memory_format=torch.channels_last))
    assert list(bound) == list(OUTPUT_LAYERS)
    for layer in OUTPUT_LAYERS:
        assert bound[layer].shape == plain[layer].shape, layer       # odd sides: floor at every pooling
        assert bound[layer].device == models.device
        torch.testing.assert_close(bound[layer], plain[layer], rtol=0, atol=0)


def test_tensorrt_options_cover_every_accepted_input(tmp_path, monkeypatch):
    monkeypatch.setenv(model.TRT_CACHE_ENV, str(tmp_path / "trt"))
    options = model.tensorrt_options(max_side_px=1024, opt_side_px=512)
    assert options["trt_profile_min_shapes"] == "image:1x3x16x16"
    assert options["trt_profile_opt_shapes"] == "image:1x3x512x512"
    assert options["trt_profile_max_shapes"] == "image:1x3x1024x1024"
    assert options["trt_engine_cache_enable"] == "True" and options["trt_fp16_enable"] == "False"
    assert options["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert model.tensorrt_options(cache_dir=tmp_path)["trt_engine_cache_path"] == str(tmp_path)
