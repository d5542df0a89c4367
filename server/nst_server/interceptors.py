"""Server interceptors (grpc.aio): one log line per RPC, and the optional bearer-token check.

Order on the server: ``[RpcLogInterceptor(), BearerTokenInterceptor(...)]``; the first is the outermost, so
calls refused for a missing token are logged too.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import logging
import time

import grpc

from nst_server import metrics

log = logging.getLogger("nst_server.rpc")

#: Per-RPC fields a handler may add to the RPC's log line (e.g. ``job``, ``iterations``); a fresh dict per RPC.
RPC_FIELDS: contextvars.ContextVar[dict] = contextvars.ContextVar("nst_rpc_fields")

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def annotate(**fields) -> None:
    """Add ``key=value`` fields to the current RPC's log line (no-op outside an intercepted RPC)."""
    current = RPC_FIELDS.get(None)
    if current is not None:
        current.update(fields)


#: A call cancelled this close to its deadline counts as DEADLINE_EXCEEDED, s: a client cancels its own call
#: when its deadline passes, which can reach the server just before the server's copy (set on arrival) expires.
DEADLINE_SLACK_S = 0.5


def deadline_passed(context) -> bool:
    """True when the call's deadline has passed (within :data:`DEADLINE_SLACK_S`)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def _final_code(context, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context) else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(exc, grpc.aio.AbortError):
        return code or grpc.StatusCode.UNKNOWN
    if exc is not None:
        return grpc.StatusCode.UNKNOWN           # what gRPC sends for an unhandled exception
    return code or grpc.StatusCode.OK


def _wrap(behavior, method: str):
    """The same handler with timing and one log line at its end; behaviours of unknown kinds unchanged."""
    def finish(context, started: float, fields: dict, exc: BaseException | None, peer: str) -> None:
        code = _final_code(context, exc)
        metrics.RPCS.labels(method, code.name).inc()
        extra = "".join(f" {key}={value}" for key, value in fields.items() if key != "job")
        log.info("rpc=%s job=%s status=%s duration_ms=%.1f peer=%s%s", method, fields.get("job", "-"),
                 code.name, (time.perf_counter() - started) * 1000, peer, extra)

    if inspect.isasyncgenfunction(behavior):
        async def stream_wrapper(request, context):
            started, fields, exc, peer = time.perf_counter(), {}, None, context.peer()
            RPC_FIELDS.set(fields)
            responses = behavior(request, context)
            try:
                async for message in responses:
                    yield message
            except BaseException as error:
                exc = error
                raise
            finally:
                await responses.aclose()         # runs the handler's cleanup now, not when collected
                finish(context, started, fields, exc, peer)
        return stream_wrapper
    if inspect.iscoroutinefunction(behavior):
        async def wrapper(request, context):
            started, fields, exc, peer = time.perf_counter(), {}, None, context.peer()
            RPC_FIELDS.set(fields)
            try:
                return await behavior(request, context)
            except BaseException as error:
                exc = error
                raise
            finally:
                finish(context, started, fields, exc, peer)
        return wrapper
    return behavior


def _replace_behaviors(handler: grpc.RpcMethodHandler, make) -> grpc.RpcMethodHandler:
    kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    return handler._replace(**{kind: make(getattr(handler, kind)) for kind in kinds
                               if getattr(handler, kind) is not None})


class RpcLogInterceptor(grpc.aio.ServerInterceptor):
    """One INFO line per RPC on logger ``nst_server.rpc`` when it ends, health and reflection included::

        rpc=/nst.v1.StyleTransfer/Stylize job=3f2a… status=CANCELLED duration_ms=812.4 peer=ipv4:… iterations=7

    and ``nst_rpcs_total{method,code}``. Handlers add fields with :func:`annotate`.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return _replace_behaviors(handler, lambda behavior: _wrap(behavior, method))


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` metadata with UNAUTHENTICATED.

    The header is read as HTTP reads credentials (RFC 9110 section 11.4, RFC 6750 section 2.1): the key and the
    auth scheme in any case (``bearer``, ``BEARER``), one or more spaces after the scheme, spaces and tabs
    around the value ignored; the token itself is case-sensitive and compared in constant time.

    Args:
        token: the expected token (compared in constant time).
        protect_health: also check ``grpc.health.v1.Health`` calls; by default health stays open, so that
            load balancers and orchestrators can probe without a secret. Reflection is always checked.
    Raises:
        ValueError: an empty token, or one with characters other than printable ASCII.
    """

    def __init__(self, token: str, protect_health: bool = False) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        if not all(" " <= char <= "~" for char in token):
            raise ValueError("--auth-token: may hold printable ASCII characters only: no client can send others "
                             "in the gRPC header 'authorization: Bearer <token>'")
        self._expected = token.encode()
        self.protect_health = protect_health

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                given = value.encode() if isinstance(value, str) else value
                scheme, _, token = given.strip(b" \t").partition(b" ")
                exact = hmac.compare_digest(given, b"Bearer " + self._expected)    # a token with edge spaces
                return exact or (scheme.lower() == b"bearer"
                                 and hmac.compare_digest(token.lstrip(b" "), self._expected))
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if not self.protect_health and handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")
        return _replace_behaviors(handler, lambda behavior: deny)
