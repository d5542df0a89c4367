"""The style-transfer server: engine, onnxruntime session and PyTorch replica, gRPC servicer, CLI."""

import os as _os

#: Entries kept by oneDNN's primitive cache and by ideep's (PyTorch's oneDNN layer) computation cache: one entry
#: per convolution direction and input shape. Their default of 1024 each let a server's resident memory grow by
#: about 1 MiB per new image shape for hundreds of shapes (+20 % RSS over 40 jobs of 40 sizes, measured); one job
#: uses at most about 80 (13 convolutions, forward and backward, at each pyramid level of one scale), so 256
#: bounds the memory without recreating primitives inside a job (256 px default job: 0.374 s per iteration
#: against 0.369 s with the defaults, within noise). Set in the environment here, before
#: anything imports torch (PyTorch reads them when it loads); an operator's own setting wins. Sources: oneDNN's
#: "Primitive cache" page (ONEDNN_PRIMITIVE_CACHE_CAPACITY); ideep's utils/lru_cache.hpp (LRU_CACHE_CAPACITY).
KERNEL_CACHE_CAPACITY = 256
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    _os.environ.setdefault(_name, str(KERNEL_CACHE_CAPACITY))

from nst_proto.extras import require_extra as _require_extra  # noqa: E402  (after the environment above)

_require_extra(("torch", "onnx", "onnxruntime", "grpc_reflection", "prometheus_client"), "server")
