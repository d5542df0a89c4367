"""Python client of the ``nst.v1.StyleTransfer`` gRPC API (synchronous; needs only grpcio and protobuf).

Every ``grpc.RpcError`` is turned into :class:`NSTError`, which carries the status code and the server's
message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nst_client._proto.nst.v1 import style_transfer_pb2 as pb
from nst_client._proto.nst.v1 import style_transfer_pb2_grpc as pb_grpc

#: Client receive limit for stream messages, bytes (results of large images exceed gRPC's 4 MiB default).
MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024 * 1024

STOP_REASONS = {value: name for name, value in pb.StopReason.items()}


class NSTError(Exception):
    """A failed call: ``code`` is the ``grpc.StatusCode``, ``details`` the server's message, and
    ``field_violations`` the ``google.rpc.BadRequest`` field violations the server attached (every
    INVALID_ARGUMENT carries one) as ``(field, description)`` pairs, e.g.
    ``[("content_image", "is 12x12 px; its shorter side must be at least 16 px …")]``; empty otherwise."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 field_violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field_violations = list(field_violations or [])

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "NSTError":
        return cls(error.code(), error.details() or "", _field_violations(error))


def _field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """``google.rpc.BadRequest`` field violations in the error's ``grpc-status-details-bin`` trailer
    (grpcio-status); empty when there are none or the trailer cannot be read."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status
    except ImportError:
        return []
    try:
        status = rpc_status.from_call(error)
    except (AttributeError, TypeError, ValueError):    # not a call object, or code/message mismatch
        return []
    violations = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return violations


@dataclass(frozen=True)
class StylizeResult:
    """The final image and its costs (see ``nst.v1.Result``)."""

    job_id: str
    image_png: bytes
    width_px: int
    height_px: int
    content_cost: float
    style_cost: float
    total_cost: float
    iterations: int
    best_iteration: int
    stop_reason: str
    elapsed_ms: float
    progress: list[pb.Progress]
    precision: str = ""                 # the replica's precision the job ran at ("fp32", "bf16", "fp16")

    def save(self, path: str | os.PathLike) -> None:
        """Write the PNG bytes to ``path``."""
        with open(path, "wb") as handle:
            handle.write(self.image_png)


def read_image_bytes(image: bytes | str | os.PathLike) -> bytes:
    """Bytes as they are, or the contents of a file path."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    with open(image, "rb") as handle:
        return handle.read()


#: Option name -> (proto enum, value prefix); the allowed values are the enum's, lower-cased, without prefix.
_ENUMS = {
    "optimizer": (pb.Optimizer, "OPTIMIZER_"),
    "preset": (pb.Preset, "PRESET_"),
    "init": (pb.Init, "INIT_"),
    "pooling": (pb.Pooling, "POOLING_"),
    "color_control": (pb.ColorControl, "COLOR_CONTROL_"),
    "precision": (pb.Precision, "PRECISION_"),
    "normalization": (pb.Normalization, "NORMALIZATION_"),
}
#: Option name -> its allowed values, e.g. ``CHOICES["optimizer"] == ("lbfgs", "adam")``.
CHOICES = {name: tuple(key[len(prefix):].lower() for key in enum.keys() if not key.endswith("_UNSPECIFIED"))
           for name, (enum, prefix) in _ENUMS.items()}
_OPTIONAL_SCALARS = ("content_weight", "style_weight", "seed", "learning_rate", "noise_ratio", "style_scale",
                     "tv_weight", "convergence_tolerance", "scales", "pyramid_levels")
_PLAIN_SCALARS = ("max_side_px", "iterations", "progress_every", "start_side_px", "preview_every",
                  "preview_max_side_px", "lbfgs_history", "keep_content_alpha")

Image = bytes | str | os.PathLike


def build_request(content: Image, style: Image | None = None, *,
                  styles: list[tuple[Image, float]] | None = None,
                  init_image: Image | None = None,
                  content_layers: dict[str, float] | None = None,
                  style_layers: dict[str, float] | None = None,
                  **options) -> pb.StylizeRequest:
    """A ``StylizeRequest``. Images are encoded bytes or file paths; options left out (or ``None``/0) take
    the server's defaults (see the README's parameter table and ``proto/nst/v1/style_transfer.proto``).

    Args:
        content: the content image.
        style: a style image (blend weight 1); may be omitted when ``styles`` is given.
        styles: more style images with their relative blend weights.
        init_image: the initial image for ``init="image"``.
        content_layers, style_layers: ``{layer: weight}``, e.g. ``{"relu4_2": 1.0}``.
        **options: ``max_side_px``, ``iterations``, ``content_weight``, ``style_weight``, ``seed``,
            ``learning_rate``, ``noise_ratio``, ``style_scale``, ``tv_weight``, ``convergence_tolerance``,
            ``scales``, ``pyramid_levels``, ``progress_every``, ``start_side_px``, ``preview_every``, ``preview_max_side_px``,
            ``lbfgs_history``, ``keep_content_alpha`` (bool), and the names ``optimizer`` (lbfgs, adam),
            ``preset`` (seed, classic), ``init``
            (noisy_content, content, random, image), ``pooling`` (max, avg), ``color_control`` (none,
            luminance, match_style_colors), ``precision`` (auto, fp32, bf16, fp16), ``normalization``
            (target, none).
    Raises:
        ValueError: an unknown option or option value. OSError: an image path cannot be read.
    """
    request = pb.StylizeRequest(content_image=read_image_bytes(content))
    if style is not None:
        request.style_image = read_image_bytes(style)
    for image, weight in styles or ():
        request.styles.add(image=read_image_bytes(image), blend_weight=weight)
    if init_image is not None:
        request.init_image = read_image_bytes(init_image)
    for layer, weight in (content_layers or {}).items():
        request.content_layers.add(layer=layer, weight=weight)
    for layer, weight in (style_layers or {}).items():
        request.style_layers.add(layer=layer, weight=weight)
    for name, value in options.items():
        if value is None:
            continue
        if name in _ENUMS:
            if value not in CHOICES[name]:
                raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}")
            enum, prefix = _ENUMS[name]
            setattr(request, name, enum.Value(prefix + value.upper()))
        elif name in _OPTIONAL_SCALARS or name in _PLAIN_SCALARS:
            setattr(request, name, value)
        else:
            raise ValueError(f"unknown option {name!r}")
    return request


class NSTClient:
    """A channel to one server; use as a context manager, or call :meth:`close`.

    Args:
        target: ``host:port``.
        timeout_s: default deadline for :meth:`stylize` calls, seconds (``None``: no deadline).
        tls: connect with TLS, verifying the server against the system's root certificates (or ``tls_ca``).
        tls_ca: PEM bytes or file path of the CA (or the self-signed certificate) that signed the server's
            certificate; implies ``tls``.
        tls_server_name: the name to verify the server's certificate against when it differs from the host
            in ``target`` (e.g. ``localhost`` for a certificate made for that name).
        token: sent as ``authorization: Bearer <token>`` metadata on every call (servers started with
            ``--auth-token``). Without TLS it travels in clear text.
    Raises:
        OSError: ``tls_ca`` names a file that cannot be read.
    """

    def __init__(self, target: str, timeout_s: float | None = None, *, tls: bool = False,
                 tls_ca: bytes | str | os.PathLike | None = None, tls_server_name: str | None = None,
                 token: str | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls or tls_ca is not None:
            root = None
            if isinstance(tls_ca, bytes | bytearray):
                root = bytes(tls_ca)
            elif tls_ca is not None:
                with open(tls_ca, "rb") as handle:
                    root = handle.read()
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = pb_grpc.StyleTransferStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> "NSTClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """The server's health status name (``SERVING``, ``NOT_SERVING`` …). Raises :class:`NSTError`."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                                       metadata=self._metadata)
        except grpc.RpcError as error:
            raise NSTError.from_rpc_error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout_s: float = 120.0) -> None:
        """Block until health is SERVING. Raises :class:`NSTError` (DEADLINE_EXCEEDED) after ``timeout_s``."""
        import time
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                grpc.channel_ready_future(self._channel).result(timeout=max(0.1, deadline - time.monotonic()))
                if self.health() == "SERVING":
                    return
            except (NSTError, grpc.FutureTimeoutError):
                pass
            if time.monotonic() >= deadline:
                raise NSTError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"{self.target} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)

    def model_info(self, timeout_s: float = 5.0) -> pb.ModelInfo:
        """``GetModelInfo``. Raises :class:`NSTError`."""
        try:
            return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise NSTError.from_rpc_error(error) from None

    def stream(self, request: pb.StylizeRequest, timeout_s: float | None = None) -> Iterator[pb.StylizeResponse]:
        """The raw response stream of one job. Closing the iterator early cancels the job.

        Raises:
            NSTError: the call failed (status code and the server's message).
        """
        call = self._stub.Stylize(request, timeout=timeout_s if timeout_s is not None else self.timeout_s,
                                  metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise NSTError.from_rpc_error(error) from None
        finally:
            call.cancel()

    def stylize(self, content: bytes | str | os.PathLike, style: bytes | str | os.PathLike, *,
                on_progress=None, timeout_s: float | None = None, **options) -> StylizeResult:
        """Run one job to completion.

        Args:
            content, style: encoded image bytes or file paths.
            on_progress: called with each ``nst.v1.Progress`` as it arrives.
            timeout_s: deadline for the whole job, seconds.
            **options: :func:`build_request` keywords (``max_side_px``, ``iterations``, ``content_weight`` …).
        Raises:
            NSTError: the server refused or failed the job. ValueError, OSError: from :func:`build_request`.
        """
        request = build_request(content, style, **options)
        job_id, progress, final, chunks = "", [], None, []
        # Read to the end of the stream, past the Result: leaving early would cancel the call, and the server
        # would count a delivered job as cancelled.
        for message in self.stream(request, timeout_s=timeout_s):
            kind = message.WhichOneof("event")
            if kind == "accepted":
                job_id = message.accepted.job_id
            elif kind == "progress":
                progress.append(message.progress)
                if on_progress is not None:
                    on_progress(message.progress)
            elif kind == "image_chunk":
                chunks.append(message.image_chunk.data)
            elif kind == "result":
                result = message.result
                if chunks:
                    result.image_png = b"".join(chunks)
                final = StylizeResult(
                    job_id=job_id, image_png=result.image_png, width_px=result.width_px,
                    height_px=result.height_px, content_cost=result.costs.content, style_cost=result.costs.style,
                    total_cost=result.costs.total, iterations=result.iterations,
                    best_iteration=result.best_iteration, stop_reason=STOP_REASONS[result.stop_reason],
                    elapsed_ms=result.elapsed_ms, progress=progress, precision=result.precision)
        if final is None:
            raise NSTError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
        return final
