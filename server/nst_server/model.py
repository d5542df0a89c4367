"""One ONNX file, two views of it: an onnxruntime session for forward passes and a PyTorch replica for
gradients with respect to the image.

Both are built from the same ``.onnx`` file (the replica reads the graph's initializers), so they cannot carry
different weights; ``tests/test_parity.py`` checks that they agree.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from nst_export.vgg import OUTPUT_LAYERS, VGG19Features

log = logging.getLogger(__name__)

#: Execution providers in order of preference; those that fail to load are dropped by onnxruntime.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class ModelFileError(RuntimeError):
    """The ONNX file is missing, unreadable, or is not a VGG-19 feature stack written by ``nst-export``."""


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """Providers to ask onnxruntime for: ``requested`` (or :data:`PREFERRED_PROVIDERS`) that this build has.

    Without an explicit request and without a visible CUDA device, the GPU providers are not tried (the
    onnxruntime-gpu build lists them as available even then, and each failed load prints an error).
    CPUExecutionProvider is always last.
    """
    available = set(ort.get_available_providers())
    wanted = requested or list(PREFERRED_PROVIDERS)
    if requested is None and not torch.cuda.is_available():
        log.info("no CUDA device visible: using CPUExecutionProvider")
        wanted = ["CPUExecutionProvider"]
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


@dataclass
class StyleModels:
    """The onnxruntime session and the PyTorch replica of one exported VGG-19 feature stack.

    Attributes:
        session: forward passes (style Gram targets, content features, costs of the delivered image).
        replica: forward + backward passes during optimisation.
        providers: execution providers the session actually uses (``session.get_providers()``).
        metadata: the ONNX file's ``metadata_props``.
    """

    path: Path
    session: ort.InferenceSession
    replica: VGG19Features
    providers: list[str]
    metadata: dict[str, str]
    device: torch.device
    output_names: list[str] = field(default_factory=lambda: list(OUTPUT_LAYERS))

    @classmethod
    def load(cls, path: str | os.PathLike, providers: list[str] | None = None,
             device: str | None = None, intra_op_threads: int = 0) -> "StyleModels":
        """Load ``path`` into an onnxruntime session and a replica.

        Args:
            path: ``.onnx`` written by ``nst-export``.
            providers: execution providers to try, in order; default TensorRT, CUDA, CPU (those this
                onnxruntime build has). onnxruntime falls back to the next one when a provider fails to load.
            device: torch device for the replica; default ``cuda`` when available, else ``cpu``.
            intra_op_threads: onnxruntime intra-op threads (0: its default, one per physical core).
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
        session = ort.InferenceSession(proto.SerializeToString(), sess_options=options,
                                       providers=choose_providers(providers))
        active = session.get_providers()
        log.info("onnxruntime %s session on %s; replica on %s", ort.__version__, active, torch_device)
        return cls(path=path, session=session, replica=replica, providers=active, metadata=metadata,
                   device=torch_device)

    @property
    def weights_sha256(self) -> str:
        return self.metadata.get("nst.weights_sha256", "")

    @property
    def input_contract(self) -> dict:
        return json.loads(self.metadata.get("nst.input_contract", "{}"))

    def features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward pass through the onnxruntime session.

        Args:
            image: ``(B, 3, H, W)`` float32 RGB in [0, 1] (any device; copied to host).
        Returns:
            ``{layer: (B, C_l, H_l, W_l) float32}`` on the replica's device, for every layer in
            :data:`OUTPUT_LAYERS`.
        """
        array = np.ascontiguousarray(image.detach().to("cpu", torch.float32).numpy())
        outputs = self.session.run(self.output_names, {"image": array})
        return {name: torch.from_numpy(value).to(self.device) for name, value in zip(self.output_names, outputs)}
