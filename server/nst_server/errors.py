"""The server's domain errors, each carrying what the caller needs as attributes (the request field, the reason,
the gRPC status it maps to). The servicer turns them into statuses in one place
(:func:`nst_server.servicer.abort_for`); nothing recovers a field by parsing a message.

Modelled on KServe's model server (``kserve/errors.py``): exceptions as data, mapped to status codes once.
"""

from __future__ import annotations

import grpc


class NSTServerError(Exception):
    """Base of the server's domain errors. ``status`` is the gRPC status code a call ends with."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class FieldError(NSTServerError, ValueError):
    """A request field (or job control) out of range or unusable: INVALID_ARGUMENT.

    Attributes:
        field: the request field's name as the proto spells it (``max_side_px``, ``styles[2].image``), or ""
            for the request as a whole. It becomes the ``google.rpc.BadRequest`` field violation's ``field``.
        reason: what is wrong, with the limit where one was crossed (the violation's ``description``).

    ``str(error)`` is ``"{field}: {reason}"`` (``reason`` alone when ``field`` is ""). A ``ValueError``, so
    in-process callers of the engine that catch ``ValueError`` keep working.
    """

    status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class ImageInputError(FieldError):
    """An input image that cannot be used: empty, not an image, truncated, or outside the size limits.

    ``over_limit`` is True when a size limit refused it (not the decoder): the servicer counts those apart.
    """

    def __init__(self, field: str, reason: str, over_limit: bool = False) -> None:
        super().__init__(field, reason)
        self.over_limit = over_limit


class ServerBusy(NSTServerError):
    """N jobs run and Q wait already: RESOURCE_EXHAUSTED; the message says so and names the limits."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class CheckpointMismatch(NSTServerError, ValueError):
    """A :class:`~nst_server.events.Checkpoint` given as ``resume`` does not fit the job's schedule (another number
    of scales, an iteration outside its scale, pixels of another size: the server's software or limits changed
    since it was written). Raised by the engine before its first iteration; the job API then runs the job from
    its first iteration."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class ModelFileError(NSTServerError, RuntimeError):
    """The ONNX file is missing, unreadable, or is not a VGG-19 feature stack written by ``nst-export``
    (raised at start-up, before any call: the process exits with the message)."""

    status = grpc.StatusCode.FAILED_PRECONDITION
