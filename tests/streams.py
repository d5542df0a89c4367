"""A Stylize call read on its own thread, with the arrival time of every message (tests of long streams and
fleets)."""

from __future__ import annotations

import threading
import time

import grpc

from nst_client import NSTError
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc


class TimedStream:
    """A Stylize call on its own channel (``options``: gRPC channel arguments), read on a thread.

    ``messages`` holds ``(time.monotonic(), StylizeResponse)`` pairs; ``error`` the final status as an
    :class:`NSTError` (None when the stream ended OK); :meth:`cancel` cancels the call as a client does.
    """

    def __init__(self, target: str, request, timeout_s: float | None = 300, options=()) -> None:
        self.messages: list[tuple[float, object]] = []
        self.error: NSTError | None = None
        self.done = threading.Event()
        self.started = time.monotonic()
        self._channel = grpc.insecure_channel(target, options=list(options))
        self._call = pb_grpc.StyleTransferStub(self._channel).Stylize(request, timeout=timeout_s)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self.messages.append((time.monotonic(), message))
        except grpc.RpcError as error:
            self.error = NSTError.from_rpc_error(error)
        finally:
            self.done.set()
            self._channel.close()

    @property
    def responses(self) -> list:
        """The StylizeResponse messages so far, without their arrival times."""
        return [message for _, message in list(self.messages)]

    def kinds(self) -> list[str]:
        """The event kind of every message so far (``accepted``, ``progress``, ``result`` …)."""
        return [message.WhichOneof("event") for message in self.responses]

    def progress_count(self) -> int:
        return self.kinds().count("progress")

    def of_kind(self, kind: str) -> list[tuple[float, object]]:
        """``(arrival time, inner message)`` of every message of one kind (``heartbeat``, ``progress`` …)."""
        return [(at, getattr(m, kind)) for at, m in list(self.messages) if m.WhichOneof("event") == kind]

    def gaps_s(self, since: float | None = None, until: float | None = None) -> list[float]:
        """Seconds between consecutive messages that arrived in ``[since, until]``."""
        times = [at for at, _ in list(self.messages)
                 if (since is None or at >= since) and (until is None or at <= until)]
        return [b - a for a, b in zip(times, times[1:])]

    def cancel(self) -> None:
        """Cancel the call and wait for the reader to see it end."""
        self._call.cancel()
        assert self.done.wait(timeout=30)
