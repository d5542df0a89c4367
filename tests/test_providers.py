"""Execution providers and devices as they are obtained, not as they are listed: TensorRT only where its library
loads, a warning when the session obtains other providers than asked for, onnxruntime's out-of-memory errors
mapped like torch's, ``--require-cuda`` refusing a CPU start. Each runs on a CPU machine; where a GPU is visible
the CPU-only cases skip, saying why."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from nst_server import model
from nst_server.jobs import is_out_of_memory


@pytest.mark.skipif(model.tensorrt_loadable()[0], reason="TensorRT's library loads on this machine")
def test_tensorrt_is_left_out_when_its_library_does_not_load(caplog):
    """onnxruntime-gpu lists TensorrtExecutionProvider without TensorRT installed; asked for it, onnxruntime
    printed an "EP Error" and fell back silently. Now it is not asked for, with a warning naming the library."""
    requested = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.INFO, logger="nst_server.model"):
        chosen = model.choose_providers(requested)
    assert "TensorrtExecutionProvider" not in chosen and chosen[-1] == "CPUExecutionProvider"
    assert any("TensorrtExecutionProvider left out" in r.getMessage() and "libnvinfer" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: CUDA would be obtained")
def test_the_session_warns_when_it_obtains_other_providers_than_asked(onnx_path, caplog):
    with caplog.at_level(logging.WARNING, logger="nst_server.model"):
        models = model.StyleModels.load(onnx_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                        device="cpu")
    assert models.providers == ["CPUExecutionProvider"]
    assert any("obtained ['CPUExecutionProvider']" in r.getMessage() for r in caplog.records), caplog.text


def test_cuda_options_search_heuristically_and_keep_fp32():
    options = model.cuda_options(1)
    assert options["device_id"] == "1" and options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options["use_tf32"] == "0" and options["arena_extend_strategy"] == "kSameAsRequested"


@pytest.mark.parametrize("error", [
    ort_errors.RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                                "running Conv node. Name:'/conv4_1/Conv' Status Message: /onnxruntime_src/onnxruntime/"
                                "core/framework/bfc_arena.cc:359 void* onnxruntime::BFCArena::AllocateRawInternal("
                                "size_t, bool, onnxruntime::Stream*) Failed to allocate memory for requested buffer "
                                "of size 8589934592"),
    ort_errors.Fail("[ONNXRuntimeError] : 1 : FAIL : CUDNN failure 4: CUDNN_STATUS_ALLOC_FAILED"),
    ort_errors.RuntimeException("CUDA failure 2: out of memory ; GPU=0"),
])
def test_onnxruntime_out_of_memory_counts_as_out_of_memory(error):
    """onnxruntime's exceptions are not RuntimeErrors: its allocation failures ended jobs INTERNAL instead of
    RESOURCE_EXHAUSTED."""
    assert not isinstance(error, RuntimeError) and is_out_of_memory(error)


def test_other_onnxruntime_errors_are_not_out_of_memory():
    assert not is_out_of_memory(ort_errors.InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : "
                                                           "Got invalid dimensions for input: image"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: --require-cuda would start")
def test_require_cuda_refuses_to_serve_on_the_cpu(onnx_path):
    run = subprocess.run([sys.executable, "-m", "nst_server.cli", "--model", str(onnx_path), "--port", "0",
                          "--require-cuda"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--require-cuda" in run.stderr and "no CUDA device" in run.stderr, run.stderr
    assert "listening" not in run.stdout and "Traceback" not in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_a_driver_torch_cannot_use_is_a_warning(tmp_path, monkeypatch, caplog):
    """A node whose driver is older than torch's CUDA build needs got the CPU silently (an INFO line); with the
    driver's device present, it is a warning naming torch's CUDA version."""
    fake = tmp_path / "nvidiactl"
    fake.touch()
    monkeypatch.setattr(model, "NVIDIA_DEVICE", fake)
    with caplog.at_level(logging.INFO, logger="nst_server.model"):
        assert model.choose_providers() == ["CPUExecutionProvider"]
    assert any(r.levelno == logging.WARNING and "sees no usable CUDA device" in r.getMessage()
               for r in caplog.records)
