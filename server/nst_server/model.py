"""One ONNX file, two views of it: an onnxruntime session for forward passes and a PyTorch replica for
gradients with respect to the image.

Both are built from the same ``.onnx`` file (the replica reads the graph's initializers), so they cannot carry
different weights; ``tests/test_parity.py`` checks that they agree.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from nst_export.vgg import LAYER_STRIDE, MIN_SIDE_PX, OUTPUT_CHANNELS, OUTPUT_LAYERS, VGG19Features
from nst_server.errors import ModelFileError

log = logging.getLogger(__name__)

#: Execution providers in order of preference; those that fail to load are dropped by onnxruntime.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

#: Lever: run the session through onnxruntime's IO binding (``InferenceSession.io_binding``): the input is
#: bound to the torch tensor's memory and the outputs to torch tensors allocated on the replica's device, so
#: on CUDA nothing goes through the host (without it: device -> numpy -> device for every forward pass).
IO_BINDING = True

#: Directory of TensorRT's engine cache ($NST_TRT_CACHE; default ~/.cache/nst/tensorrt).
TRT_CACHE_ENV = "NST_TRT_CACHE"


def tensorrt_options(max_side_px: int = 1024, opt_side_px: int = 512, max_batch: int = 1,
                     cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """TensorRT execution provider options: one optimisation profile covering every input the server accepts,
    and a persistent engine cache.

    Without a profile TensorRT builds a new engine for each input shape it meets (tens of seconds each); with
    ``trt_profile_{min,opt,max}_shapes`` one engine serves ``(1..max_batch, 3, 16..max_side, 16..max_side)``
    and is tuned for ``(1, 3, opt_side, opt_side)``. ``trt_engine_cache_enable`` keeps the built engine (and
    the timing cache) under ``cache_dir`` across restarts. Precision stays fp32 (``trt_fp16_enable`` off): the
    session computes the targets and the delivered image's costs, which are fp32 whatever precision the
    replica's passes run at.

    Source: onnxruntime's TensorRT execution provider documentation (provider options, "Explicit shape range
    for dynamic shape input").
    """
    cache = Path(cache_dir or os.environ.get(TRT_CACHE_ENV) or Path.home() / ".cache" / "nst" / "tensorrt")
    return {
        "trt_profile_min_shapes": f"image:1x3x{MIN_SIDE_PX}x{MIN_SIDE_PX}",
        "trt_profile_opt_shapes": f"image:1x3x{opt_side_px}x{opt_side_px}",
        "trt_profile_max_shapes": f"image:{max_batch}x3x{max_side_px}x{max_side_px}",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": "False",
        "trt_max_workspace_size": str(4 << 30),
    }


#: The TensorRT runtime library onnxruntime-gpu's TensorRT provider loads (TensorRT 10; the provider's own
#: ``libonnxruntime_providers_tensorrt.so`` ships in the wheel, TensorRT itself does not).
TENSORRT_LIBRARIES = ("libnvinfer.so.10",)


#: The NVIDIA driver's control device: present where a GPU driver is loaded (and given to this container).
NVIDIA_DEVICE = Path("/dev/nvidiactl")


def tensorrt_loadable() -> tuple[bool, str]:
    """Whether TensorRT's runtime library loads in this process (``ctypes.CDLL``), and what was tried.

    onnxruntime-gpu lists TensorrtExecutionProvider as available whether or not TensorRT is installed; asked for
    it without ``libnvinfer``, it prints an "EP Error" to stdout and falls back to the next provider.
    """
    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
            return True, f"{name} loaded"
        except OSError as exc:
            reason = f"{name} does not load ({exc})"
    return False, reason


#: cuDNN's convolution algorithm search of the session's CUDA execution provider (:func:`cuda_options`).
CUDNN_CONV_ALGO_SEARCH = "HEURISTIC"


def cuda_options(device_id: int = 0) -> dict[str, str]:
    """CUDA execution provider options of the session.

    - ``cudnn_conv_algo_search`` HEURISTIC: cuDNN's exhaustive search benchmarks every convolution algorithm for
      each new input shape (reported on an H200: 142 ms per new shape, 17 ms with HEURISTIC, 6 ms repeated); a
      job meets about 18 shapes (pyramid levels, scales, the delivered image).
    - ``arena_extend_strategy`` kSameAsRequested: the arena grows by what is asked, not in powers of two, so a
      large picture's activations do not reserve twice their size.
    - ``use_tf32`` 0: the session computes the style targets and the delivered image's costs, which are strict
      fp32 (TF32 convolutions differ from fp32 by 3-4e-4 per layer).

    Source: onnxruntime's CUDA execution provider documentation (configuration options).
    """
    return {"device_id": str(device_id), "cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH,
            "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """Providers to ask onnxruntime for: ``requested`` (or :data:`PREFERRED_PROVIDERS`) that this build has.

    Without an explicit request and without a visible CUDA device, the GPU providers are not tried (the
    onnxruntime-gpu build lists them as available even then, and each failed load prints an error).
    TensorRT is asked for only when its library loads (:func:`tensorrt_loadable`; a warning when it was
    requested explicitly). CPUExecutionProvider is always last.
    """
    available = set(ort.get_available_providers())
    wanted = requested or list(PREFERRED_PROVIDERS)
    if requested is None and not torch.cuda.is_available():
        if NVIDIA_DEVICE.exists():          # a GPU driver is there, yet torch cannot use it: say so loudly
            log.warning("an NVIDIA driver is present (%s) but torch %s (CUDA %s) sees no usable CUDA device (a "
                        "driver older than this CUDA build needs, or no device given to this container): serving "
                        "on the CPU", NVIDIA_DEVICE, torch.__version__, torch.version.cuda)
        else:
            log.info("no CUDA device visible: using CPUExecutionProvider")
        wanted = ["CPUExecutionProvider"]
    if "TensorrtExecutionProvider" in wanted and "TensorrtExecutionProvider" in available:
        loadable, why = tensorrt_loadable()
        if not loadable:
            (log.warning if requested else log.info)("TensorrtExecutionProvider left out: %s", why)
            wanted = [name for name in wanted if name != "TensorrtExecutionProvider"]
    missing = [name for name in wanted if name not in available]
    if requested and missing:
        log.warning("execution providers %s are not in this onnxruntime build (%s %s has %s)", missing,
                    "onnxruntime", ort.__version__, sorted(available))
    chosen = [name for name in wanted if name in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def build_replica(proto: onnx.ModelProto, device: torch.device | str = "cpu") -> VGG19Features:
    """The PyTorch autograd replica of the exported graph, weights read from its initializers.

    Raises:
        ModelFileError: an initializer the replica needs is missing or has another shape.
    """
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    pooling = metadata.get("nst.pooling", "max")
    replica = VGG19Features(pooling=pooling)
    initializers = {init.name: init for init in proto.graph.initializer}
    state = {}
    for name, tensor in replica.state_dict().items():
        if name not in initializers:
            raise ModelFileError(f"the ONNX graph has no initializer {name!r}; re-export it with nst-export")
        value = torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())
        if value.shape != tensor.shape:
            raise ModelFileError(f"initializer {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(tensor.shape)}")
        state[name] = value
    replica.load_state_dict(state)
    return replica.to(device).eval().requires_grad_(False)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere): after a job
    its activations' memory is free but, fragmented between arenas, stays resident otherwise."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


@dataclass
class StyleModels:
    """The onnxruntime session and the PyTorch replica of one exported VGG-19 feature stack.

    Attributes:
        session: forward passes (style Gram targets, content features, costs of the delivered image).
        replica: forward + backward passes during optimisation.
        providers: execution providers the session actually uses (``session.get_providers()``).
        metadata: the ONNX file's ``metadata_props``.
        style_cache: style Gram matrices of recent style images, an LRU managed by
            :func:`nst_server.targets.style_grams` under ``style_cache_lock``.
        replica_channels_last: whether the replica's weights are now in channels_last
            (:func:`nst_server.objective.replica_input` converts them once, under ``layout_lock``).
        replica_casts: copies of the replica with their weights in a lower precision, by dtype
            (:func:`nst_server.objective.replica_for`, made once under ``layout_lock``).
    """

    path: Path
    session: ort.InferenceSession
    replica: VGG19Features
    providers: list[str]
    metadata: dict[str, str]
    device: torch.device
    output_names: list[str] = field(default_factory=lambda: list(OUTPUT_LAYERS))
    style_cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    style_cache_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    replica_channels_last: bool = False
    replica_casts: dict = field(default_factory=dict, repr=False, compare=False)
    layout_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike, providers: list[str] | None = None,
             device: str | None = None, intra_op_threads: int = 0,
             trt_options: dict[str, str] | None = None) -> "StyleModels":
        """Load ``path`` into an onnxruntime session and a replica.

        Args:
            path: ``.onnx`` written by ``nst-export``.
            providers: execution providers to try, in order; default TensorRT, CUDA, CPU (those this
                onnxruntime build has). onnxruntime falls back to the next one when a provider fails to load.
            device: torch device for the replica; default ``cuda`` when available, else ``cpu``. On CUDA, fp32
                is strict fp32: TF32 is turned off for matrix products and cuDNN convolutions (process-wide torch
                settings; cuDNN's default allows TF32, 3-4e-4 relative error per layer).
            intra_op_threads: onnxruntime intra-op threads (0: its default, one per physical core).
            trt_options: TensorRT provider options (default :func:`tensorrt_options`), used when TensorRT is
                among the providers.
        Raises:
            ModelFileError: missing or malformed file.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist; run nst-export first")
        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and others
            raise ModelFileError(f"cannot read {path}: {exc}") from exc
        outputs = [out.name for out in proto.graph.output]
        if outputs != list(OUTPUT_LAYERS):
            raise ModelFileError(f"{path} has outputs {outputs}, expected {list(OUTPUT_LAYERS)}")
        metadata = {entry.key: entry.value for entry in proto.metadata_props}
        torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if torch_device.type == "cuda":
            # fp32 jobs are strict fp32 on a GPU too, as the name says and the parity test measures: TF32 off for
            # matrix products (torch's default) and for cuDNN convolutions (on by default). A job wanting speed
            # on a GPU gets bf16 (precision auto, compute capability 8.0 or later); nst-gpu-check's sweep
            # measures TF32 beside both (PyTorch docs, "TensorFloat-32 (TF32) on Ampere (and later) devices").
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        replica = build_replica(proto, torch_device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # The session runs a few forward passes per job between long replica passes: idle workers that spin
        # would take the cores the replica needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No CPU memory arena: the arena keeps the largest forward pass's activations for the life of the process
        # (0.23 GiB at 512 px); without it one 512 px job peaks at 1.43 GiB instead of 1.66 (nst-benchmark).
        options.enable_cpu_mem_arena = False
        chosen = choose_providers(providers)
        names = list(chosen)
        if "TensorrtExecutionProvider" in chosen:
            trt = trt_options if trt_options is not None else tensorrt_options()
            Path(trt.get("trt_engine_cache_path", ".")).mkdir(parents=True, exist_ok=True)
            chosen = [("TensorrtExecutionProvider", trt) if name == "TensorrtExecutionProvider" else name
                      for name in chosen]
        device_id = (torch_device.index or 0) if torch_device.type == "cuda" else 0
        chosen = [("CUDAExecutionProvider", cuda_options(device_id)) if name == "CUDAExecutionProvider" else name
                  for name in chosen]
        session = ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=chosen)
        active = session.get_providers()
        if active != names:
            log.warning("onnxruntime was asked for execution providers %s and obtained %s (a provider that fails "
                        "to load is dropped; its reason is in onnxruntime's output above)", names, active)
        log.info("onnxruntime %s session on %s; replica on %s", ort.__version__, active, torch_device)
        return cls(path=path, session=session, replica=replica, providers=active, metadata=metadata,
                   device=torch_device)

    @property
    def weights_sha256(self) -> str:
        return self.metadata.get("nst.weights_sha256", "")

    @property
    def input_contract(self) -> dict:
        return json.loads(self.metadata.get("nst.input_contract", "{}"))

    @property
    def session_device(self) -> torch.device:
        """Where the session wants its inputs and outputs: the replica's CUDA device when the session runs on a
        GPU provider, else the host."""
        on_gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(self.providers)
        return self.device if (on_gpu and self.device.type == "cuda") else torch.device("cpu")

    def features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward pass through the onnxruntime session.

        Args:
            image: ``(B, 3, H, W)`` float32 RGB in [0, 1], ``H, W >= 16``, any device and memory format.
        Returns:
            ``{layer: (B, C_l, H // s_l, W // s_l) float32}`` on the replica's device, for every layer in
            :data:`OUTPUT_LAYERS` (``C_l``: :data:`OUTPUT_CHANNELS`, ``s_l``: ``LAYER_STRIDE``).
        Raises:
            onnxruntime's errors (``RuntimeException`` …) as they come, e.g. out of device memory.
        """
        if IO_BINDING:
            return self._features_io_binding(image)
        array = np.ascontiguousarray(image.detach().to("cpu", torch.float32).numpy())
        outputs = self.session.run(self.output_names, {"image": array})
        return {name: torch.from_numpy(value).to(self.device) for name, value in zip(self.output_names, outputs)}

    def _features_io_binding(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.session_device
        ort_device = "cuda" if device.type == "cuda" else "cpu"
        index = (device.index or 0) if device.type == "cuda" else 0
        image = image.detach().to(device, torch.float32).contiguous()
        batch, _, height, width = image.shape
        outputs = {name: torch.empty(batch, OUTPUT_CHANNELS[name], height // LAYER_STRIDE[name],
                                     width // LAYER_STRIDE[name], dtype=torch.float32, device=device)
                   for name in self.output_names}
        binding = self.session.io_binding()
        binding.bind_input("image", ort_device, index, np.float32, tuple(image.shape), image.data_ptr())
        for name, tensor in outputs.items():
            binding.bind_output(name, ort_device, index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()   # torch has written the input on its own stream
        # onnxruntime's IO binding page: synchronise the bound inputs before the run and the outputs after it
        # (no-ops on the CPU; on CUDA the provider runs on its own stream).
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return {name: tensor.to(self.device) for name, tensor in outputs.items()}
