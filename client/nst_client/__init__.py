"""Client of the ``nst.v1.StyleTransfer`` gRPC service: library (:class:`NSTClient`, and
:class:`AsyncNSTClient` on ``grpc.aio``), CLI (``nst``), and the generated stubs."""

from nst_client.aio import AsyncNSTClient
from nst_client.client import NSTClient, NSTError, Reattach, Retry, StylizeResult
from nst_client.options import StylizeOptions, build_request

__all__ = ["AsyncNSTClient", "NSTClient", "NSTError", "Reattach", "Retry", "StylizeOptions", "StylizeResult",
           "build_request"]
