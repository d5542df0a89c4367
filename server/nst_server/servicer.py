"""The gRPC face of the engine: request validation, admission, the worker threads, proto conversion.

Jobs run on a dedicated thread pool of ``max_running_jobs`` threads, never on the asyncio event loop, so
health checks and GetModelInfo answer while jobs run. A job's events cross to the event loop through an
``asyncio.Queue``; when the client cancels, disconnects or passes its deadline, the handler's ``finally`` sets
the job's stop flag, which the engine polls once per iteration.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import onnxruntime
import torch
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from nst_client._proto.nst.v1 import style_transfer_pb2 as pb
from nst_client._proto.nst.v1 import style_transfer_pb2_grpc as pb_grpc
from nst_export.vgg import MIN_SIDE_PX, OUTPUT_LAYERS
from nst_server import engine
from nst_server.images import ImageInputError
from nst_server.messages import RequestError, decode_inputs, settings_from_request, to_proto
from nst_server.model import StyleModels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Per-server limits (configuration, not per request).

    Attributes:
        max_side_px: largest ``max_side_px`` a job may ask for.
        max_iterations: largest ``iterations`` a job may ask for.
        max_input_pixels: pixel budget of each encoded input image, checked before decoding.
        max_running_jobs: N, jobs optimised at once (one worker thread each).
        max_queued_jobs: Q, jobs admitted to wait for a worker; beyond N + Q, RESOURCE_EXHAUSTED at once.
    """

    max_side_px: int = 1024
    max_iterations: int = 2000
    max_input_pixels: int = 40_000_000
    max_running_jobs: int = 1
    max_queued_jobs: int = 4


_DONE = object()


class StyleTransferServicer(pb_grpc.StyleTransferServicer):
    """Implements ``nst.v1.StyleTransfer`` over one :class:`StyleModels`."""

    def __init__(self, models: StyleModels | None, limits: ServerLimits | None = None) -> None:
        self.models = models
        self.limits = limits or ServerLimits()
        self._executor = ThreadPoolExecutor(max_workers=self.limits.max_running_jobs, thread_name_prefix="nst-job")
        self._admitted = 0                      # running + waiting; touched only on the event loop
        self._running = 0                       # touched from worker threads under _lock
        self._lock = threading.Lock()
        self.accepting = True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        if self.models is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        meta = self.models.metadata
        return pb.ModelInfo(
            output_layers=list(OUTPUT_LAYERS),
            input_contract_json=meta.get("nst.input_contract", ""),
            weights_source=meta.get("nst.weights_source", ""),
            weights_sha256=meta.get("nst.weights_sha256", ""),
            weights_input_contract_json=meta.get("nst.weights_input_contract", ""),
            execution_providers=self.models.providers,
            replica_device=str(self.models.device),
            pooling=meta.get("nst.pooling", ""),
            versions={"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                      "grpcio": grpc.__version__},
            min_side_px=MIN_SIDE_PX,
            max_side_px=self.limits.max_side_px,
        )

    async def Stylize(self, request: pb.StylizeRequest, context):
        job_id = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        status = grpc.StatusCode.OK
        try:
            if not self.accepting:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            if self.models is None:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; watch grpc.health.v1")
            try:
                settings = settings_from_request(request, self.limits)
            except RequestError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field) from None
            capacity = self.limits.max_running_jobs + self.limits.max_queued_jobs
            if self._admitted >= capacity:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"server busy: {self._admitted} jobs admitted, limit {self.limits.max_running_jobs} "
                             f"running + {self.limits.max_queued_jobs} queued; retry later")
            position = max(0, self._admitted - self.limits.max_running_jobs + 1)
            self._admitted += 1
            try:
                yield pb.StylizeResponse(accepted=pb.JobAccepted(job_id=job_id, queue_position=position))
                async for message in self._run(job_id, request, settings):
                    yield message
            finally:
                self._admitted -= 1
        except _Abort as exc:
            status = exc.code
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:         # with google.rpc.BadRequest details
                await context.abort_with_status(exc.rpc_status())
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            raise
        finally:
            log.info("rpc=Stylize job=%s status=%s duration_ms=%.0f", job_id, status.name,
                     (time.perf_counter() - started) * 1000)

    async def _run(self, job_id: str, request: pb.StylizeRequest, settings: engine.StyleTransferSettings):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        limits = self.limits

        def put(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            if stop.is_set():                     # cancelled while waiting for a worker
                put(_DONE)
                return
            try:
                inputs = decode_inputs(request, limits.max_input_pixels)
                for event in engine.stylize(self.models, inputs, settings, should_stop=stop.is_set):
                    put(event)
            except BaseException as exc:  # reported to the handler, which maps it to a status
                put(exc)
            finally:
                put(_DONE)

        future = loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, ImageInputError | ValueError):
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(item), getattr(item, "field", None))
                if isinstance(item, BaseException):
                    log.exception("job %s failed", job_id, exc_info=item)
                    raise _Abort(grpc.StatusCode.INTERNAL, f"job {job_id} failed: {type(item).__name__}: {item}")
                yield to_proto(item)
        finally:
            stop.set()
            if not future.done():
                # Do not block the event loop; the worker sees the flag within one iteration.
                future.add_done_callback(lambda f: f.exception())


_REQUEST_FIELDS = frozenset(pb.StylizeRequest.DESCRIPTOR.fields_by_name)


class _Abort(Exception):
    """End the call with ``code`` and ``message``; ``field`` names the offending request field (when None,
    the request field the message starts with, e.g. ``"max_side_px must be …"``, else "" for the request as
    a whole)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field

    def rpc_status(self) -> grpc.Status:
        """The status with one ``google.rpc.BadRequest`` field violation (field, description) in its details
        (grpcio-status; clients read it with ``grpc_status.rpc_status.from_call``)."""
        field = self.field
        if field is None:
            head = re.split(r"[\s:\[.]", self.message, maxsplit=1)[0]
            field = head if head in _REQUEST_FIELDS else ""
        description = self.message.removeprefix(f"{field}: ") if field else self.message
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message,
                                                       details=[detail]))
