"""Python client of the ``nst.v1.StyleTransfer`` gRPC API (synchronous; needs only grpcio and protobuf).

Every ``grpc.RpcError`` is turned into :class:`NSTError`, which carries the status code and the server's
message.

One client can serve from many replicas: a target that names several addresses (``ipv4:10.0.0.1:50051,
10.0.0.2:50051``) or a resolver (``dns:///nst-headless.NAMESPACE.svc:50051``) gets gRPC's ``round_robin``
balancing and a retry policy for refusals that come before any response (RESOURCE_EXHAUSTED at admission,
UNAVAILABLE while a replica loads or drains), through a gRPC service config (gRFC A6 "Client retries").

:meth:`NSTClient.stylize` runs its job through the job API where the server has it (``SubmitJob`` under a
``request_id`` made once per call, then ``WatchJob``): a stream that breaks is reattached with ``WatchJob(after=
the last event seen)`` on the replica that owns the job, and the job is sent again (same ``request_id``) only
when that replica stays unreachable for ``reattach_s`` or no longer knows the job. Servers without the job API
(UNIMPLEMENTED) get the ``Stylize`` stream, sent again when it breaks after ``JobAccepted``. On a fleet, the calls
about one job (WatchJob, GetJob, GetJobResult, CancelJob) go to the replica that holds it: the one named in the
job id (:mod:`nst_proto.jobids`; its pod under a ``dns:`` target), or the address that answers ``GetJob``.

The job's controls are :class:`nst_client.options.StylizeOptions`; :class:`nst_client.aio.AsyncNSTClient` is
this client on asyncio (``grpc.aio``), built from the helpers here.
"""

from __future__ import annotations

import ipaddress
import json
import math
import numbers
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nst_proto import MAX_TIMEOUT_S
from nst_proto.files import atomic_write_bytes
from nst_proto.jobids import job_owner
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc
# Re-exported: ``from nst_client.client import CHOICES, build_request`` predates nst_client.options.
from nst_client.options import (CHOICES, Image, StylizeOptions, StylizeOverrides, build_request,  # noqa: F401
                                read_image_bytes)

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

#: Client receive limit for stream messages, bytes (results of large images exceed gRPC's 4 MiB default).
MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024 * 1024

STOP_REASONS = {value: name for name, value in pb.StopReason.items()}

#: Client keepalive defaults (gRPC's "Keepalive User Guide for gRPC Core", gRFC A8): a ping after this many
#: seconds without activity, also with no call in flight, and the connection is given up when the ping is not
#: answered within the timeout. nst-server accepts pings every 5 s or more (``--min-ping-interval-s``); gRPC
#: servers with the default policy (300 s) answer more frequent pings with GOAWAY ``too_many_pings``.
KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S = 20.0, 10.0

#: Attempts gRPC makes for one call refused before any response (gRPC caps it at 5), and the backoff between
#: them (randomised up to the current value, which grows by the multiplier up to the maximum).
RETRY_MAX_ATTEMPTS, RETRY_INITIAL_BACKOFF_S, RETRY_MAX_BACKOFF_S = 5, 0.1, 1.0
#: Status codes retried before any response: the replica is full, or loading, or draining.
RETRYABLE_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")
#: Status codes after ``JobAccepted`` that mean the replica went away (killed, connection lost, shutdown grace
#: over): the job is sent again.
RESUBMIT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
#: Default of the clients' ``reattach_s``: how long :meth:`NSTClient.stylize` keeps reattaching to a job whose
#: stream broke (``WatchJob`` on its replica) before it sends the job again, s.
REATTACH_S = 15.0
#: Status codes of a broken ``WatchJob`` that end the reattaching at once: the call itself is refused.
NO_REATTACH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                               grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})
#: Deadline of one ``GetJob`` asking an address whether it holds a job (routing on a fleet), and of the
#: ``SubmitJob`` and ``CancelJob`` calls :meth:`NSTClient.stylize` makes, s.
ROUTE_PROBE_S, SUBMIT_S, CANCEL_S = 5.0, 60.0, 10.0
#: ``JobEvent.error_code`` (a status code number) -> ``grpc.StatusCode``.
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: A failed job's message about one request field (``content_image: …``, ``styles[1].image: …``).
_FIELD_MESSAGE = re.compile(r"([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_][a-z0-9_]*)*): (.+)", re.DOTALL)


def service_config(max_attempts: int = RETRY_MAX_ATTEMPTS, health_check: bool = True) -> str:
    """The gRPC service config (JSON) of a balanced client: ``round_robin`` over every resolved address, and a
    ``retryPolicy`` on ``nst.v1.StyleTransfer`` for :data:`RETRYABLE_CODES`.

    gRPC retries a call only while it has received no response headers; nst-server refuses (admission, loading,
    shutdown) before sending any, so a refused job goes to the next replica. With ``health_check``, gRPC watches
    each address's ``grpc.health.v1`` status of ``nst.v1.StyleTransfer`` and round robin skips the ones not
    SERVING (loading, draining); leave it off for servers whose health service wants a token (``--auth-health``),
    whose watches would fail. Sources: gRPC's "Service Config in gRPC", gRFC A6 (client retries) and A17
    (client-side health checking).

    Raises:
        ValueError: ``max_attempts`` under 2 (no retry) or over 5 (gRPC's cap).
    """
    if not 2 <= max_attempts <= 5:
        raise ValueError(f"max_attempts must be between 2 and 5 (gRPC's cap), got {max_attempts}")
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": "nst.v1.StyleTransfer"}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": f"{RETRY_INITIAL_BACKOFF_S}s",
                "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": list(RETRYABLE_CODES),
            },
        }],
    }
    if health_check:
        config["healthCheckConfig"] = {"serviceName": "nst.v1.StyleTransfer"}
    return json.dumps(config)


def is_balanced_target(target: str) -> bool:
    """True for a target that can name several servers: several addresses (``ipv4:A:P,B:P``) or a resolver
    scheme (``dns:``, ``ipv4:``, ``ipv6:``, in any case: RFC 3986 schemes are case-insensitive, and so is gRPC).
    A plain ``host:port`` is one server."""
    scheme, _ = _split_scheme(target)
    return "," in target or scheme in ("dns", "ipv4", "ipv6")


#: Target URI schemes gRPC (grpcio) resolves; any other ``word:`` prefix is a host name (``localhost:50051``).
TARGET_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p")
#: The forms a target may take, for error messages.
TARGET_FORMS = ("HOST:PORT (127.0.0.1:50051, nst.example.com:50051, [::1]:50051), "
                "ipv4:HOST:PORT,HOST:PORT,…, ipv6:[ADDRESS]:PORT,…, dns:///NAME:PORT or unix:PATH")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)


def _split_scheme(target: str) -> tuple[str, str]:
    """``(scheme in lower case, the rest)`` of a target with a scheme gRPC resolves, else ``("", target)``."""
    match = _SCHEME.fullmatch(target)
    if match and match.group(1).lower() in TARGET_SCHEMES:
        return match.group(1).lower(), match.group(2)
    return "", target


def _host_port(text: str, target: str, literal: str | None = None) -> tuple[str, int]:
    """``(host, port)`` of one ``HOST:PORT`` or ``[IPV6]:PORT`` of ``target``; ``literal``: the host must be an
    address of that version (``"ipv4"``/``"ipv6"``). Raises ValueError naming the expected form."""
    where = f"target {target!r}" + (f": {text!r}" if text != target else "")
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ValueError(f"{where} has no port; give [ADDRESS]:PORT, e.g. [::1]:50051")
        port = port[1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{where}: {host!r} in brackets is not an IPv6 address; e.g. [::1]:50051") from None
        if literal == "ipv4":
            raise ValueError(f"{where}: an ipv4: target lists IPv4 addresses, e.g. ipv4:127.0.0.1:50051")
    else:
        if text.count(":") > 1:
            raise ValueError(f"{where}: an IPv6 address needs brackets and a port, e.g. [::1]:50051 "
                             "(ipv6:[::1]:50051 with the scheme)")
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError(f"{where} has no port; give HOST:PORT, e.g. {text or '127.0.0.1'}:50051")
        if literal == "ipv6":
            raise ValueError(f"{where}: an ipv6: target lists bracketed IPv6 addresses, e.g. ipv6:[::1]:50051")
        if literal == "ipv4":
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{where}: {host!r} is not an IPv4 address (an ipv4: target lists addresses, "
                                 "e.g. ipv4:10.0.0.1:50051,10.0.0.2:50051; use dns:///NAME:PORT for names)") from None
    if not host:
        raise ValueError(f"{where} has no host; give HOST:PORT, e.g. 127.0.0.1{text}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{where}: the port must be a number between 1 and 65535, got {port!r}; "
                         "give HOST:PORT, e.g. 127.0.0.1:50051")
    return host, int(port)


def target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names: one for ``host:port`` and ``dns:``, each address of ``ipv4:``/``ipv6:``
    lists, none for ``unix:``, ``vsock:`` and the other schemes (no host name to connect to).

    Raises:
        ValueError: a form gRPC would misread or not resolve, naming the form expected: a bare IPv6 address
            (``::1:50051``: write ``[::1]:50051``), no port (``127.0.0.1``: HOST:PORT), a port outside 1..65535,
            several plain addresses (``a:1,b:2``: ``ipv4:a:1,b:2``), a URL (``http://…``), whitespace, an empty
            target.
    """
    if not isinstance(target, str):
        raise TypeError(f"target must be a str such as '127.0.0.1:50051', got {type(target).__name__}")
    if not target or any(char.isspace() for char in target):
        raise ValueError(f"target {target!r}: expected {TARGET_FORMS}, without spaces")
    scheme, rest = _split_scheme(target)
    if scheme in ("ipv4", "ipv6"):
        return [_host_port(item, target, literal=scheme)[0] for item in rest.split(",")]
    if scheme == "dns":
        path = rest
        if rest.startswith("//"):                     # dns://[DNS-SERVER]/NAME:PORT
            _, slash, path = rest[2:].partition("/")
            if not slash:
                raise ValueError(f"target {target!r}: expected dns:///NAME:PORT (three slashes) or dns:NAME:PORT")
        if "," in path:
            raise ValueError(f"target {target!r}: a dns: target names one NAME:PORT; list addresses as "
                             "ipv4:HOST:PORT,HOST:PORT")
        return [_host_port(path, target)[0]]
    if scheme:                                        # unix:, unix-abstract:, vsock:, xds: …
        if not rest.strip("/"):
            raise ValueError(f"target {target!r}: the {scheme}: scheme needs a path or name after it")
        return []
    match = _SCHEME.fullmatch(target)
    if match and match.group(2).startswith("//"):
        raise ValueError(f"target {target!r}: {match.group(1)}:// is not a gRPC target scheme; expected "
                         f"{TARGET_FORMS}")
    if "," in target:
        raise ValueError(f"target {target!r}: several servers are written ipv4:HOST:PORT,HOST:PORT (or "
                         "ipv6:[ADDRESS]:PORT,…); a plain target is one HOST:PORT")
    return [_host_port(target, target)[0]]


def check_target(target: str) -> str:
    """``target`` when it is a form the client connects to as meant (:func:`target_hosts`), else ValueError
    naming the expected form (TypeError: not a str)."""
    target_hosts(target)
    return target


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _is_loopback_host(host: str) -> bool:
    host = host.split("%", 1)[0].rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):           # RFC 6761: always the loopback interface
        return True
    try:
        return ipaddress.ip_address(host).is_loopback                  # 127.0.0.0/8, ::1
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """True when every host ``target`` names is the loopback interface (127.0.0.0/8, ::1, ``localhost``);
    False for other targets and for ``unix:`` (never proxied) and malformed ones."""
    try:
        hosts = target_hosts(target)
    except (TypeError, ValueError):
        return False
    return bool(hosts) and all(_is_loopback_host(host) for host in hosts)


#: The environment variables gRPC reads the HTTP CONNECT proxy from, in its order (the first one set wins; set
#: and empty: no proxy), and those of its exemptions (gRPC's doc/environment_variables.md and "Default HTTP Proxy
#: Mapper User Guide for gRPC Core").
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")
NO_PROXY_VARIABLES = ("no_grpc_proxy", "no_proxy")


def _exempt(host: str, entries: str) -> bool:
    """gRPC's no_proxy rule: an entry the host name ends with (case-insensitive), or a CIDR range holding it."""
    for entry in (item.strip() for item in entries.split(",")):
        if not entry:
            continue
        if host.lower().endswith(entry.lower()):
            return True
        try:
            if ipaddress.ip_address(host.split("%", 1)[0]) in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def proxy_in_use(target: str, channel_options: Sequence[tuple[str, str | int]] = (),
                 environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """``(where it was set, proxy URI)`` of the HTTP CONNECT proxy gRPC sends calls to ``target`` through, e.g.
    ``("$http_proxy", "http://127.0.0.1:3128")``, or None: direct. Follows gRPC's rules: the
    ``grpc.http_proxy`` channel argument, else the first of :data:`PROXY_VARIABLES` that is set; none for
    ``grpc.enable_http_proxy`` 0 (which the clients set for loopback targets), ``unix:``/``vsock:`` targets, or
    hosts that ``no_grpc_proxy``/``no_proxy`` exempt."""
    environ = os.environ if environ is None else environ
    options = dict(channel_options)
    if not options.get("grpc.enable_http_proxy", 1):
        return None
    if "grpc.http_proxy" in options:
        where, uri = "the channel argument grpc.http_proxy", str(options["grpc.http_proxy"])
    else:
        where, uri = next(((f"${name}", environ[name]) for name in PROXY_VARIABLES if name in environ), ("", ""))
    if not uri:
        return None
    scheme, _ = _split_scheme(target)
    if scheme in ("unix", "unix-abstract", "vsock"):
        return None
    exemptions = next((environ[name] for name in NO_PROXY_VARIABLES if name in environ), None)
    if exemptions is not None:
        try:
            hosts = target_hosts(target)
        except (TypeError, ValueError):
            hosts = []
        if len(hosts) == 1 and _exempt(hosts[0], exemptions):
            return None
    return where, uri


#: Keepalive times above this are no keepalive pings, s: gRPC takes int32 milliseconds (INT_MAX: off).
MAX_KEEPALIVE_S = (2**31 - 1) / 1000.0


def _real(value, argument: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{argument} must be a number of seconds, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{argument} must be a number of seconds, got NaN")
    return value


def check_timeout(value: float | None, argument: str = "timeout_s") -> float | None:
    """A deadline argument as gRPC takes it, s: None (no deadline) for None, ``math.inf`` and anything above
    :data:`MAX_TIMEOUT_S`; else ``value``.

    Raises:
        ValueError: NaN, zero or negative (the message names ``argument``). TypeError: not a number.
    """
    if value is None:
        return None
    value = _real(value, argument)
    if value <= 0:
        raise ValueError(f"{argument} must be > 0 s (None or inf: no deadline), got {value!r}")
    return None if value > MAX_TIMEOUT_S else value


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
    def from_rpc_error(cls, error: grpc.RpcError, proxy: tuple[str, str] | None = None) -> "NSTError":
        """The error of a failed call; ``proxy`` (:func:`proxy_in_use`): the call went through that HTTP proxy,
        which an UNAVAILABLE's message then names (gRPC's names only the proxy's address)."""
        code, details = error.code(), error.details() or ""
        if proxy is not None and code == grpc.StatusCode.UNAVAILABLE:
            details += _proxy_note(proxy)
        return cls(code, details, _field_violations(error))


def _proxy_note(proxy: tuple[str, str]) -> str:
    where, uri = proxy
    return (f" (the call went through the HTTP proxy {uri}, set by {where}; to connect directly, add the "
            "server's host to $no_grpc_proxy or $no_proxy, or unset it)")


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
    """The final image and its costs (see ``nst.v1.Result``); its repr leaves out the PNG and the progress."""

    job_id: str
    image_png: bytes = field(repr=False)
    width_px: int
    height_px: int
    content_cost: float
    style_cost: float
    total_cost: float
    iterations: int
    best_iteration: int
    stop_reason: str
    elapsed_ms: float
    progress: list[pb.Progress] = field(repr=False)
    precision: str = ""                 # the replica's precision the job ran at ("fp32", "bf16", "fp16")
    attempts: int = 1                   # times the job was sent (client side: refusals and broken streams)
    replica: str = ""                   # HOSTNAME/PID of the server that delivered it (JobAccepted.replica)

    def save(self, path: str | os.PathLike) -> None:
        """Write the PNG bytes to ``path``, atomically: to a temporary file in the same folder, then renamed
        (:func:`nst_proto.files.atomic_write_bytes`), so a failed write leaves an older file of that name whole.

        Raises:
            OSError: nothing was written.
        """
        atomic_write_bytes(path, self.image_png)


@dataclass(frozen=True)
class Retry:
    """Why :meth:`NSTClient.stylize` sends a job again (handed to its ``on_retry``).

    Attributes:
        attempt: the attempt about to start (2 for the first retry).
        error: what ended the previous attempt.
        accepted: True when the previous attempt had been accepted (its stream broke: the replica was lost and
            the job starts over), False when it was refused before (every replica busy, loading or draining).
        wait_s: the pause before the next attempt, s.
    """

    attempt: int
    error: "NSTError"
    accepted: bool
    wait_s: float


@dataclass(frozen=True)
class Reattach:
    """:meth:`NSTClient.stylize` is following its job again after the stream broke (handed to its
    ``on_reattach`` once the new ``WatchJob`` stream delivered its first message).

    Attributes:
        job_id: the job (the job API's id).
        after: the last event number seen before the break; the new stream starts after it.
        error: what broke the stream.
        tries: ``WatchJob`` calls it took to reattach (1: the first one).
        waited_s: from the break to the first message of the new stream, s.
    """

    job_id: str
    after: int
    error: "NSTError"
    tries: int
    waited_s: float


class _JobLost(Exception):
    """The job of a :meth:`NSTClient.stylize` call cannot be followed any more (its replica is unreachable for
    ``reattach_s``, or no longer knows it): it is sent again."""

    def __init__(self, error: "NSTError") -> None:
        super().__init__(str(error))
        self.error = error


class _Reattaching:
    """When :meth:`NSTClient.stylize` (and the asyncio client's) watches its job again after a break: for up to
    ``reattach_s`` after the last message, with a backoff from 0.1 s doubling to 2 s; never past the deadline."""

    def __init__(self, job_id: str, reattach_s: float, attempts: "_Attempts") -> None:
        self.job_id, self.reattach_s, self.attempts = job_id, reattach_s, attempts
        self.after = 0
        self.broken_at: float | None = None
        self.error: NSTError | None = None
        self.tries, self.backoff_s = 0, 0.1

    def received(self, event: pb.JobEvent) -> Reattach | None:
        """A message arrived; the :class:`Reattach` to report when it is the first after a break."""
        reattached = None
        if self.broken_at is not None:
            reattached = Reattach(self.job_id, self.after, self.error, self.tries,
                                  time.monotonic() - self.broken_at)
            self.broken_at, self.error, self.tries, self.backoff_s = None, None, 0, 0.1
        if event.number:
            self.after = event.number
        return reattached

    def broke(self, error: NSTError) -> float:
        """The stream broke with ``error``: the pause before the next ``WatchJob``, s.

        Raises:
            NSTError: ``error``, when it ends the job's call (the deadline passed, a refusal of the call).
            _JobLost: the replica no longer knows the job (NOT_FOUND), or did not answer for ``reattach_s``.
        """
        now = time.monotonic()
        if error.code == grpc.StatusCode.NOT_FOUND:
            raise _JobLost(error)
        if error.code in NO_REATTACH_CODES:
            raise error
        deadline = self.attempts.deadline
        if deadline is not None and now >= deadline - 0.05:          # gRPC's deadline of the watch: ours
            raise error if error.code == grpc.StatusCode.DEADLINE_EXCEEDED else NSTError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed while reattaching to job {self.job_id} ({error})")
        if self.broken_at is None:
            self.broken_at = now
        self.error = error
        if now - self.broken_at >= self.reattach_s:
            raise _JobLost(error)
        wait_s, self.backoff_s = self.backoff_s, min(2 * self.backoff_s, 2.0)
        self.tries += 1
        return wait_s


@dataclass(frozen=True)
class _Connection:
    """What both clients make their channel from (:func:`_connection`)."""

    balanced: bool
    arguments: list[tuple[str, str | int]]                 # gRPC channel arguments
    proxy: tuple[str, str] | None                          # the HTTP proxy the calls go through (proxy_in_use)
    credentials: grpc.ChannelCredentials | None            # None: a plain-text channel
    metadata: tuple[tuple[str, str], ...] | None           # the token's authorization header


def _connection(target: str, *, tls: bool, tls_ca: bytes | str | os.PathLike | None, tls_server_name: str | None,
                token: str | None, balance: bool | None, max_resubmits: int, busy_retry_s: float,
                keepalive_time_s: float, keepalive_timeout_s: float,
                channel_options: Sequence[tuple[str, str | int]]) -> _Connection:
    """Checks :class:`NSTClient`'s arguments and turns them into channel arguments, credentials and metadata
    (shared with :class:`nst_client.aio.AsyncNSTClient`). Raises OSError, TypeError and ValueError as NSTClient
    says."""
    check_target(target)
    if not isinstance(max_resubmits, numbers.Integral) or isinstance(max_resubmits, bool):
        raise TypeError(f"max_resubmits must be an int, got {type(max_resubmits).__name__} {max_resubmits!r}")
    if max_resubmits < 0:
        raise ValueError(f"max_resubmits must be >= 0, got {max_resubmits}")
    if _real(busy_retry_s, "busy_retry_s") < 0:
        raise ValueError(f"busy_retry_s must be >= 0 s (inf: until the deadline), got {busy_retry_s!r}")
    if not _real(keepalive_time_s, "keepalive_time_s") >= 1:
        raise ValueError(f"keepalive_time_s must be >= 1 s (inf: no keepalive pings), got {keepalive_time_s!r}")
    if not _real(keepalive_timeout_s, "keepalive_timeout_s") > 0:
        raise ValueError(f"keepalive_timeout_s must be > 0 s, got {keepalive_timeout_s!r}")
    if token and not all(" " <= char <= "~" for char in token):
        # gRPC refuses other header characters only when a call is made, as "INTERNAL: Invalid metadata".
        raise ValueError("token: may hold printable ASCII characters only (it travels as the gRPC header "
                         "'authorization: Bearer <token>'); this one holds others (a newline, non-ASCII)")
    balanced = is_balanced_target(target) if balance is None else balance
    options: dict[str, str | int] = {
        "grpc.max_receive_message_length": MAX_RECEIVE_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_RECEIVE_MESSAGE_BYTES,
        "grpc.keepalive_time_ms": round(min(keepalive_time_s, MAX_KEEPALIVE_S) * 1000),     # INT_MAX: off
        "grpc.keepalive_timeout_ms": round(min(keepalive_timeout_s, MAX_KEEPALIVE_S) * 1000),
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }
    if balanced:
        # A token may mean a protected health service: no health watches then (refusals are still retried).
        options["grpc.service_config"] = service_config(health_check=token is None)
        options["grpc.enable_retries"] = 1
        # A call is retried only while its request fits the retry buffer (gRPC's default: 256 KiB, less
        # than one photo): let it hold the largest request we send.
        options["grpc.per_rpc_retry_buffer_size"] = MAX_RECEIVE_MESSAGE_BYTES
    if tls_server_name:
        options["grpc.ssl_target_name_override"] = tls_server_name
    if is_loopback_target(target):
        # Health checks, the demo and tests call 127.0.0.1: never through the proxy of $http_proxy & co.
        options["grpc.enable_http_proxy"] = 0
    options.update(dict(channel_options))
    credentials = None
    if tls or tls_ca is not None:
        root = None
        if isinstance(tls_ca, bytes | bytearray):
            root = bytes(tls_ca)
        elif tls_ca is not None:
            with open(tls_ca, "rb") as handle:
                root = handle.read()
        credentials = grpc.ssl_channel_credentials(root)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    return _Connection(balanced, list(options.items()), proxy_in_use(target, list(options.items())), credentials,
                       metadata)


def _health_status_name(reply: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _not_serving(target: str, timeout_s: float, proxy: tuple[str, str] | None = None) -> NSTError:
    return NSTError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{target} not SERVING after {timeout_s:.0f} s"
                    + (_proxy_note(proxy) if proxy is not None else ""))


class _Attempts:
    """When :meth:`NSTClient.stylize` (and the asyncio client's) sends a job again: the deadline of all attempts
    together, resubmissions of accepted jobs whose stream broke, and the backoff of refused ones."""

    def __init__(self, timeout_s: float | None, max_resubmits: int, busy_retry_s: float) -> None:
        now = time.monotonic()
        timeout_s = check_timeout(timeout_s)
        self.deadline = None if timeout_s is None else now + timeout_s
        self.busy_until = now + busy_retry_s
        self.max_resubmits = max_resubmits
        self.attempt, self.resubmits, self.backoff_s = 1, 0, 0.2

    def remaining_s(self) -> float | None:
        """The deadline of the next attempt, s (None: none; at least 1 ms, which expires at once)."""
        return None if self.deadline is None else max(0.001, self.deadline - time.monotonic())


    def retry(self, error: NSTError, accepted: bool, lost: bool = False) -> Retry | None:
        """The :class:`Retry` to make after ``error`` ended an attempt (``accepted``: it had its JobAccepted;
        ``lost``: its replica lost the job, whatever the code), or None: give up and raise ``error``."""
        now = time.monotonic()
        if accepted and (lost or error.code in RESUBMIT_CODES) and self.resubmits < self.max_resubmits:
            self.resubmits, wait_s = self.resubmits + 1, 0.0
        elif not accepted and error.code.name in RETRYABLE_CODES and now + self.backoff_s < self.busy_until:
            wait_s, self.backoff_s = self.backoff_s, min(2 * self.backoff_s, 2.0)
        else:
            return None
        if self.deadline is not None and now + wait_s >= self.deadline:
            return None
        self.attempt += 1
        return Retry(attempt=self.attempt, error=error, accepted=accepted, wait_s=wait_s)


class _JobReader:
    """Reads one attempt's ``StylizeResponse`` messages into a :class:`StylizeResult` (shared by both clients):
    the JobAccepted, Progress (and ``on_progress``), Heartbeat (``on_heartbeat``), ImageChunk pieces joined
    into the Result's PNG."""

    def __init__(self, attempt: int, on_progress: Callable | None, on_heartbeat: Callable | None) -> None:
        self.attempt, self.on_progress, self.on_heartbeat = attempt, on_progress, on_heartbeat
        self.accepted: pb.JobAccepted | None = None
        self.progress: list[pb.Progress] = []
        self.chunks: list[bytes] = []
        self.final: StylizeResult | None = None
        self.ended = False              # the job API reported the job's end (a result, or FAILED/CANCELLED)
        self.rerun = False              # a second JobAccepted: the job runs again (a restart of its replica)

    def feed_event(self, event: pb.JobEvent):
        """Take one ``WatchJob`` event (its ``response`` as :meth:`feed` does); a job run again after its replica
        restarted reports its iterations again: the earlier ones from there on are dropped from the progress.

        Raises:
            NSTError: the job ended FAILED or CANCELLED (its code and message).
        """
        if event.number and event.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            self.ended = True
            code = STATUS_CODES.get(event.error_code, grpc.StatusCode.UNKNOWN)
            message = event.error_message or f"the job ended {pb.JobState.Name(event.state)}"
            # The server words a field's problem "FIELD: reason", as the Stylize stream's BadRequest violation.
            violation = _FIELD_MESSAGE.fullmatch(message) if code == grpc.StatusCode.INVALID_ARGUMENT else None
            raise NSTError(code, message, [violation.groups()] if violation else None)
        kind = event.response.WhichOneof("event")
        if kind == "accepted" and self.accepted is not None:
            self.rerun = True
        elif kind == "progress" and self.rerun:
            self.rerun = False
            self.progress = [p for p in self.progress if p.iteration < event.response.progress.iteration]
        outcome = self.feed(event.response)
        if kind == "result":
            self.ended = True
        return outcome

    def feed(self, message: pb.StylizeResponse):
        """Take one message; returns what the callback it went to returned (None when none was called)."""
        kind = message.WhichOneof("event")
        if kind == "accepted":
            self.accepted = message.accepted
        elif kind == "progress":
            self.progress.append(message.progress)
            if self.on_progress is not None:
                return self.on_progress(message.progress)
        elif kind == "heartbeat":
            if self.on_heartbeat is not None:
                return self.on_heartbeat(message.heartbeat)
        elif kind == "image_chunk":
            self.chunks.append(message.image_chunk.data)
        elif kind == "result":
            result = message.result
            job = self.accepted or pb.JobAccepted()
            self.final = StylizeResult(
                job_id=job.job_id, image_png=b"".join(self.chunks) if self.chunks else result.image_png,
                width_px=result.width_px, height_px=result.height_px, content_cost=result.costs.content,
                style_cost=result.costs.style, total_cost=result.costs.total, iterations=result.iterations,
                best_iteration=result.best_iteration, stop_reason=STOP_REASONS[result.stop_reason],
                elapsed_ms=result.elapsed_ms, progress=self.progress, precision=result.precision,
                attempts=self.attempt, replica=job.replica)
        return None

    def result(self) -> StylizeResult:
        """The job's result once the stream has ended. Raises NSTError (UNKNOWN) when none came."""
        if self.final is None:
            raise NSTError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
        return self.final



#: ``state`` arguments of :meth:`NSTClient.jobs`: ``queued``, ``running``, ``succeeded``, ``failed``, ``cancelled``.
JOB_STATES = tuple(name.removeprefix("JOB_STATE_").lower() for name in pb.JobState.keys()
                   if name != "JOB_STATE_UNSPECIFIED")


def job_state(state: str | int | None) -> int:
    """``nst.v1.JobState`` number of ``state``: a name of :data:`JOB_STATES` (any case, with or without the
    ``JOB_STATE_`` prefix) or the number itself; None: 0, every state. Raises ValueError naming the choices."""
    if state is None:
        return pb.JOB_STATE_UNSPECIFIED
    if isinstance(state, int) and not isinstance(state, bool):
        if state not in pb.JobState.values():
            raise ValueError(f"state {state}: not a JobState number")
        return state
    name = str(state).strip().upper().removeprefix("JOB_STATE_")
    if name.lower() not in JOB_STATES:
        raise ValueError(f"state {state!r}: expected one of {', '.join(JOB_STATES)}")
    return pb.JobState.Value("JOB_STATE_" + name)


def state_name(state: int) -> str:
    """``queued``, ``running`` … of a ``nst.v1.JobState`` number."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _unreachable(job_id: str, targets: list[str]) -> NSTError:
    return NSTError(grpc.StatusCode.UNAVAILABLE, f"job {job_id}: no replica that answered holds it, and "
                    f"{', '.join(targets)} did not answer (its replica may be one of them)")


def _capped(timeout_s: float | None, most_s: float) -> float:
    return most_s if timeout_s is None else min(timeout_s, most_s)


def submit_request(request: pb.StylizeRequest, request_id: str | None) -> pb.SubmitJobRequest:
    """A ``SubmitJobRequest``; ``request_id`` None: a fresh UUID, so that gRPC's retries of this one submission
    (balanced targets) never make a second job."""
    return pb.SubmitJobRequest(request=request, request_id=uuid.uuid4().hex if request_id is None else request_id)


class _Client:
    """What both clients hold: the channel made from :func:`_connection`'s settings, the stubs, the call
    metadata and the resend policy. ``_channels`` is the module that opens the channel: ``grpc`` (blocking
    calls) or ``grpc.aio`` (asyncio). The arguments are documented on :class:`NSTClient`."""

    _channels = grpc

    def __init__(self, target: str, timeout_s: float | None = None, *, tls: bool = False,
                 tls_ca: bytes | str | os.PathLike | None = None, tls_server_name: str | None = None,
                 token: str | None = None, balance: bool | None = None, max_resubmits: int = 2,
                 busy_retry_s: float = 0.0, keepalive_time_s: float = KEEPALIVE_TIME_S,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                 channel_options: Sequence[tuple[str, str | int]] = (), reattach_s: float = REATTACH_S,
                 job_api: bool = True) -> None:
        if _real(reattach_s, "reattach_s") < 0:
            raise ValueError(f"reattach_s must be >= 0 s, got {reattach_s!r}")
        connection = _connection(target, tls=tls, tls_ca=tls_ca, tls_server_name=tls_server_name, token=token,
                                 balance=balance, max_resubmits=max_resubmits, busy_retry_s=busy_retry_s,
                                 keepalive_time_s=keepalive_time_s, keepalive_timeout_s=keepalive_timeout_s,
                                 channel_options=channel_options)
        self.target = target
        self.timeout_s = check_timeout(timeout_s)
        self.max_resubmits, self.busy_retry_s = max_resubmits, busy_retry_s
        self.balanced = connection.balanced
        self.proxy = connection.proxy
        if connection.credentials is not None:
            self._channel = self._channels.secure_channel(target, connection.credentials, options=connection.arguments)
        else:
            self._channel = self._channels.insecure_channel(target, options=connection.arguments)
        self._metadata = connection.metadata
        self._stub = pb_grpc.StyleTransferStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.reattach_s = float(reattach_s)
        self.job_api = bool(job_api)
        # Routing a job's calls on a fleet: one channel per replica address (no balancing, no retries), and the
        # address found for each owner (the replica name in the job id, else the job id itself).
        self._credentials = connection.credentials
        self._route_arguments = [(key, value) for key, value in connection.arguments
                                 if key not in ("grpc.service_config", "grpc.enable_retries",
                                                "grpc.per_rpc_retry_buffer_size")]
        self._route_stubs: dict[str, pb_grpc.StyleTransferStub] = {}
        self._route_channels: list = []
        self._routes: dict[str, str] = {}
        self._routes_lock = threading.Lock()

    def _route_key(self, job_id: str) -> str:
        return job_owner(job_id) or job_id

    def _route_candidates(self, job_id: str) -> list[str]:
        """The targets that may hold ``job_id`` on a balanced target, the one found before first: the owner's pod
        (``dns:///OWNER.NAME:PORT`` of a ``dns:`` target named in the id: a StatefulSet's pod behind its headless
        Service), then every address of the target (an ``ipv4:``/``ipv6:`` list, or what its name resolves to)."""
        found = [self._routes[key]] if (key := self._route_key(job_id)) in self._routes else []
        scheme, rest = _split_scheme(self.target)
        if scheme in ("ipv4", "ipv6"):
            found += [f"{scheme}:{item}" for item in rest.split(",")]
        elif scheme in ("dns", ""):
            authority, path = "", rest
            if scheme == "dns" and rest.startswith("//"):
                server, _, path = rest[2:].partition("/")
                authority = f"//{server}/"
            host, port = _host_port(path, self.target)
            literal = _is_address(host)
            owner = job_owner(job_id)
            if owner and not literal:
                found.append(f"dns:{authority}{owner}.{host}:{port}")
            try:
                addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
            except OSError:
                addresses = []
            found += [f"ipv6:[{address}]:{port}" if ":" in address else f"ipv4:{address}:{port}"
                      for address in addresses]
        return list(dict.fromkeys(found))

    def _route_stub(self, target: str) -> pb_grpc.StyleTransferStub:
        """The stub of a channel to just ``target`` (made once)."""
        with self._routes_lock:
            stub = self._route_stubs.get(target)
            if stub is None:
                arguments = list(self._route_arguments)
                host = target_hosts(self.target)
                if self._credentials is not None and host and not any(
                        key == "grpc.ssl_target_name_override" for key, _ in arguments):
                    arguments.append(("grpc.ssl_target_name_override", host[0]))    # the fleet's certificate
                if self._credentials is not None:
                    channel = self._channels.secure_channel(target, self._credentials, options=arguments)
                else:
                    channel = self._channels.insecure_channel(target, options=arguments)
                self._route_channels.append(channel)
                stub = self._route_stubs[target] = pb_grpc.StyleTransferStub(channel)
            return stub

    def _replica_stubs(self) -> list:
        """A stub per replica of a balanced target (its addresses: :meth:`_route_candidates`), else the main one."""
        if not self.balanced:
            return [self._stub]
        return [self._route_stub(target) for target in self._route_candidates("")] or [self._stub]

    def _routed(self, job_id: str, target: str) -> None:
        self._routes[self._route_key(job_id)] = target

    def _forget_route(self, job_id: str) -> None:
        """After UNAVAILABLE from the replica of ``job_id``: look for it again at the next call (a pod restarted
        on another address)."""
        self._routes.pop(self._route_key(job_id), None)

    def _known_stub(self, job_id: str):
        """The stub for ``job_id`` without asking anyone: the main one (one server), the one found before, or
        None: ask the candidates."""
        if not self.balanced:
            return self._stub
        target = self._routes.get(self._route_key(job_id))
        return None if target is None else self._route_stub(target)

    def _error(self, error: grpc.RpcError) -> NSTError:
        """``error`` as :class:`NSTError`, naming the HTTP proxy of an UNAVAILABLE call that went through one."""
        return NSTError.from_rpc_error(error, self.proxy)

    def _timeout(self, timeout_s: float | None, argument: str = "timeout_s") -> float | None:
        """A call's deadline, s: ``timeout_s`` (checked: :func:`check_timeout`), else the client's default."""
        return check_timeout(timeout_s, argument) if timeout_s is not None else self.timeout_s


class NSTClient(_Client):
    """A channel to one server or to many replicas; use as a context manager, or call :meth:`close`.

    Args:
        target: a gRPC target: ``host:port`` (``127.0.0.1:50051``, ``nst.example.com:50051``, IPv6 in
            brackets: ``[::1]:50051``); several addresses ``ipv4:127.0.0.1:5001,127.0.0.1:5002`` (or
            ``ipv6:[::1]:5001,…``); ``dns:///nst-headless.NAMESPACE.svc:50051`` (every address the name resolves
            to); ``unix:PATH``. Schemes in any case. Loopback targets (127.0.0.0/8, ``::1``, ``localhost``) are
            never called through an HTTP proxy ($grpc_proxy, $https_proxy, $http_proxy); an UNAVAILABLE call that
            went through one says so (:func:`proxy_in_use`).
        timeout_s: default deadline for :meth:`stylize` calls, seconds, > 0 (``None``, ``math.inf`` or more than
            :data:`MAX_TIMEOUT_S`: no deadline); it covers every attempt of a job.
        tls: connect with TLS, verifying the server against the system's root certificates (or ``tls_ca``).
        tls_ca: PEM bytes or file path of the CA (or the self-signed certificate) that signed the server's
            certificate; implies ``tls``.
        tls_server_name: the name to verify the server's certificate against when it differs from the host
            in ``target`` (e.g. ``localhost`` for a certificate made for that name).
        token: sent as ``authorization: Bearer <token>`` metadata on every call (servers started with
            ``--auth-token``). Without TLS it travels in clear text.
        balance: round robin over the target's addresses that are SERVING, and gRPC retries of refusals
            (:func:`service_config`); None (default): for targets that can name several servers
            (:func:`is_balanced_target`), so that a single ``host:port`` server's RESOURCE_EXHAUSTED reaches the
            caller at once.
        max_resubmits: :meth:`stylize` sends a job again at most this many times when its stream breaks after
            ``JobAccepted`` with UNAVAILABLE (the replica was killed or lost, or its shutdown grace ran out).
        busy_retry_s: :meth:`stylize` keeps sending a job refused with RESOURCE_EXHAUSTED or UNAVAILABLE (after
            gRPC's own retries) for up to this long, with a backoff from 0.2 s doubling to 2 s, s; 0: give up.
        keepalive_time_s, keepalive_timeout_s: ping the server after this long without activity, also with no
            call in flight, and give the connection up when a ping is not answered within the timeout, s; so a
            job on a frozen replica or behind a dropped NAT entry ends with UNAVAILABLE (and is resubmitted)
            instead of waiting forever. Servers must allow it (nst-server: ``--min-ping-interval-s``, 5 s).
        channel_options: more gRPC channel arguments, e.g. ``[("grpc.keepalive_time_ms", 10000)]``; they
            override the ones above.
        reattach_s: :meth:`stylize` keeps reattaching to a job whose stream broke (``WatchJob`` on its replica,
            from the last event seen) for this long after the last message, before it sends the job again, s.
        job_api: :meth:`stylize` runs its job through the job API where the server has it (default); False: on
            one ``Stylize`` stream, as before the job API (the job ends with the call: a broken stream cancels it,
            and it is sent again from the start).

        Ranges: ``max_resubmits`` an int >= 0; ``busy_retry_s``, ``reattach_s`` >= 0 (``math.inf``: until the
        deadline);
        ``keepalive_time_s`` >= 1 (``math.inf`` or above :data:`MAX_KEEPALIVE_S`: no pings);
        ``keepalive_timeout_s`` > 0.
    Raises:
        OSError: ``tls_ca`` names a file that cannot be read. ValueError: ``target`` is not one of the forms
            above (a bare IPv6 address ``::1:50051``, no port: the message names the form expected), or a number
            out of its range (NaN, negative, a ``timeout_s`` of 0, a keepalive time under 1 s), naming the
            argument. TypeError: a number argument that is not a number.
    """


    def __enter__(self) -> "NSTClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._route_channels:
            channel.close()
        self._channel.close()

    def health(self, service: str = "", timeout_s: float | None = 5.0) -> str:
        """The server's health status name (``SERVING``, ``NOT_SERVING`` …); ``timeout_s`` > 0 s (None or inf:
        no deadline). Raises :class:`NSTError`; ValueError for a ``timeout_s`` out of range."""
        timeout = check_timeout(timeout_s)
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                       metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return _health_status_name(reply)

    def wait_until_serving(self, timeout_s: float | None = 120.0) -> None:
        """Block until health is SERVING; ``timeout_s`` > 0 s (None or inf: no limit).

        Raises:
            NSTError: DEADLINE_EXCEEDED after ``timeout_s``. ValueError: ``timeout_s`` out of range.
        """
        limit = check_timeout(timeout_s)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            try:
                wait = None if deadline is None else max(0.1, deadline - time.monotonic())
                grpc.channel_ready_future(self._channel).result(timeout=wait)
                if self.health() == "SERVING":
                    return
            except (NSTError, grpc.FutureTimeoutError):
                pass
            if deadline is not None and time.monotonic() >= deadline:
                raise _not_serving(self.target, limit, self.proxy)
            time.sleep(0.2)

    def model_info(self, timeout_s: float | None = 5.0) -> pb.ModelInfo:
        """``GetModelInfo``; ``timeout_s`` > 0 s (None or inf: no deadline). Raises :class:`NSTError`; ValueError
        for a ``timeout_s`` out of range."""
        timeout = check_timeout(timeout_s)
        try:
            return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def stream(self, request: pb.StylizeRequest, timeout_s: float | None = None) -> Iterator[pb.StylizeResponse]:
        """The raw response stream of one job. Closing the iterator early cancels the job.

        Raises:
            NSTError: the call failed (status code and the server's message). ValueError: ``timeout_s`` out of
                range (as the client's).
        """
        call = self._stub.Stylize(request, timeout=self._timeout(timeout_s), metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()

    def stylize(self, content: Image, style: Image | None, options: StylizeOptions | None = None, *,
                styles: Sequence[tuple[Image, float]] | None = None, init_image: Image | None = None,
                on_progress: Callable[[pb.Progress], None] | None = None,
                on_heartbeat: Callable[[pb.Heartbeat], None] | None = None,
                on_retry: Callable[[Retry], None] | None = None,
                on_reattach: Callable[[Reattach], None] | None = None,
                timeout_s: float | None = None, **overrides: Unpack[StylizeOverrides]) -> StylizeResult:
        """Run one job to completion, following it again where its stream breaks, sending it again where another
        attempt can succeed.

        Where the server has the job API, the job is submitted (``SubmitJob``, under a ``request_id`` made once
        for this call) and followed (``WatchJob``) on the replica that holds it. A stream that breaks (the
        connection lost, a proxy's timeout, UNAVAILABLE) is reattached with ``WatchJob(after=`` the last event
        number seen ``)``, so that no event is missed or seen twice (``on_reattach``); only when the replica stays
        unreachable for ``reattach_s``, or no longer knows the job (NOT_FOUND), is the job sent again, with the same
        ``request_id`` (a replica that holds it returns it, never computes it twice), at most ``max_resubmits``
        times. Servers without the job API (UNIMPLEMENTED) get the ``Stylize`` stream instead: sent again when it
        breaks after ``JobAccepted`` with UNAVAILABLE (the job starts over on another replica; the seed makes it
        the same job). A job refused before it was accepted with RESOURCE_EXHAUSTED or UNAVAILABLE, after gRPC's
        own retries, is sent again for up to ``busy_retry_s``. ``StylizeResult.attempts`` says how many sends it
        took. A call that ends early (the deadline, an exception in a callback, KeyboardInterrupt) cancels the job
        (``CancelJob``).

        Args:
            content, style: encoded image bytes or file paths (``style`` may be None when ``styles`` is given).
            options: the job's controls (:class:`StylizeOptions`); None: the server's defaults.
            styles: more style images with their relative blend weights.
            init_image: the initial image for ``init="image"``.
            on_progress: called with each ``nst.v1.Progress`` as it arrives (iterations start again from 1
                after a resubmission).
            on_heartbeat: called with each ``nst.v1.Heartbeat`` (queue position, time waited).
            on_retry: called with a :class:`Retry` before each new attempt.
            on_reattach: called with a :class:`Reattach` when a broken stream was reattached.
            timeout_s: deadline for the whole job, all attempts together, seconds, > 0 (None: the client's
                ``timeout_s``; ``math.inf`` or more than :data:`MAX_TIMEOUT_S`: none).
            **overrides: :class:`StylizeOptions` fields applied over ``options`` (``max_side_px=256,
                iterations=200`` …).
        Raises:
            NSTError: the server refused or failed the job (FAILED: its code and message; CANCELLED: cancelled by
                someone else), the deadline passed, or the last attempt's stream broke. TypeError: an override names
                no option (before anything is sent), or a value of the wrong type. ValueError: a value out of its
                proto type's range or an unknown enum value, or ``timeout_s`` out of range. OSError: an image cannot
                be read.
        """
        request = build_request(content, style, options, styles=styles, init_image=init_image, **overrides)
        attempts = _Attempts(timeout_s if timeout_s is not None else self.timeout_s, self.max_resubmits,
                             self.busy_retry_s)
        if not self.job_api:
            return self._stylize_stream(request, attempts, _JobReader(1, on_progress, on_heartbeat), on_progress,
                                        on_heartbeat, on_retry)
        submission = submit_request(request, None)          # one request_id for every attempt of this call
        while True:
            reader = _JobReader(attempts.attempt, on_progress, on_heartbeat)
            try:
                reply = self._unary(self._stub.SubmitJob, submission, _capped(attempts.remaining_s(), SUBMIT_S))
            except NSTError as error:
                if error.code == grpc.StatusCode.UNIMPLEMENTED:       # a server without the job API
                    return self._stylize_stream(request, attempts, reader, on_progress, on_heartbeat, on_retry)
                retry = attempts.retry(error, accepted=False)
                if retry is None:
                    raise
                if on_retry is not None:
                    on_retry(retry)
                time.sleep(retry.wait_s)
                continue
            try:
                self._follow(reply.job_id, reader, attempts, on_reattach)
                return reader.result()
            except _JobLost as lost:
                retry = attempts.retry(lost.error, accepted=True, lost=True)
                if retry is None:
                    raise lost.error from None
                if on_retry is not None:
                    on_retry(retry)
                time.sleep(retry.wait_s)
            except BaseException:
                if not reader.ended:          # the caller gave up (deadline, callback, Ctrl-C): the job stops
                    self._cancel_quietly(reply.job_id)
                raise

    def _follow(self, job_id: str, reader: "_JobReader", attempts: _Attempts,
                on_reattach: Callable[[Reattach], None] | None) -> None:
        """Watch ``job_id`` into ``reader`` until its result, reattaching after breaks (:class:`_Reattaching`).
        Raises NSTError (the job failed, the deadline) or _JobLost."""
        state = _Reattaching(job_id, self.reattach_s, attempts)
        while True:
            try:
                stub = self._job_stub(job_id)
            except NSTError as routing_error:                # its replica did not answer
                time.sleep(state.broke(routing_error))
                continue
            try:
                call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after=state.after),
                                     timeout=attempts.remaining_s(), metadata=self._metadata)
                try:
                    for event in call:
                        reattached = state.received(event)
                        if reattached is not None and on_reattach is not None:
                            on_reattach(reattached)
                        reader.feed_event(event)         # NSTError: the job failed or was cancelled
                finally:
                    call.cancel()
                if reader.ended:
                    return
                error = NSTError(grpc.StatusCode.UNAVAILABLE, f"the watch of job {job_id} ended before the job did")
            except grpc.RpcError as rpc_error:
                error = self._error(rpc_error)
            if error.code == grpc.StatusCode.UNAVAILABLE:
                self._forget_route(job_id)
            time.sleep(state.broke(error))

    def _job_stub(self, job_id: str) -> pb_grpc.StyleTransferStub:
        """The stub for the calls about ``job_id``: on a fleet, its replica's (:meth:`_Client._route_candidates`,
        each asked with ``GetJob`` until one has it; remembered); else, or when none has it, the main one."""
        stub = self._known_stub(job_id)
        if stub is not None:
            return stub
        unreachable: list[str] = []
        for target in self._route_candidates(job_id):
            candidate = self._route_stub(target)
            try:
                candidate.GetJob(pb.GetJobRequest(job_id=job_id), timeout=ROUTE_PROBE_S, metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise self._error(error) from None
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    unreachable.append(target)
                continue
            self._routed(job_id, target)
            return candidate
        if unreachable:                   # the job may be on one of them: not "not found"
            raise _unreachable(job_id, unreachable)
        return self._stub

    def _cancel_quietly(self, job_id: str) -> None:
        try:
            self.cancel(job_id, timeout_s=CANCEL_S)
        except (NSTError, ValueError):
            pass

    def _stylize_stream(self, request: pb.StylizeRequest, attempts: _Attempts, reader: "_JobReader",
                        on_progress, on_heartbeat, on_retry) -> StylizeResult:
        """:meth:`stylize` over the ``Stylize`` stream (servers without the job API)."""
        while True:
            try:
                # Read to the end of the stream, past the Result: leaving early would cancel the call, and the
                # server would count a delivered job as cancelled.
                for message in self.stream(request, timeout_s=attempts.remaining_s()):
                    reader.feed(message)
                return reader.result()
            except NSTError as error:
                retry = attempts.retry(error, accepted=reader.accepted is not None)
                if retry is None:
                    raise
                if on_retry is not None:
                    on_retry(retry)
                time.sleep(retry.wait_s)
                reader = _JobReader(attempts.attempt, on_progress, on_heartbeat)

    # -- the job API: jobs that outlive their connection (nst.v1 SubmitJob, WatchJob …) ---------------------------

    def _unary(self, method, request, timeout_s: float | None):
        try:
            return method(request, timeout=check_timeout(timeout_s), metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def submit(self, content: Image, style: Image | None, options: StylizeOptions | None = None, *,
               request_id: str | None = None, styles: Sequence[tuple[Image, float]] | None = None,
               init_image: Image | None = None, timeout_s: float | None = 60.0,
               **overrides: Unpack[StylizeOverrides]) -> pb.SubmitJobResponse:
        """Submit a job that outlives this connection (``SubmitJob``); returns at once with its ``job_id``,
        queue position and state. Follow it with :meth:`watch`, :meth:`job`, fetch it with :meth:`result`.

        Args:
            content, style, options, styles, init_image, **overrides: the job, as :meth:`stylize` takes it.
            request_id: the idempotency key: the same id returns the same job (``created`` False), never a second
                one; None: a fresh UUID (retries of this call stay one job).
            timeout_s: deadline of the call, s (None or inf: none).
        Raises:
            NSTError: INVALID_ARGUMENT (with field violations, as Stylize), ALREADY_EXISTS (``request_id`` names a
                job of another request), RESOURCE_EXHAUSTED (busy, memory, or the server's state folder over its
                budget), UNAVAILABLE. TypeError, ValueError, OSError: as :meth:`stylize`.
        """
        request = build_request(content, style, options, styles=styles, init_image=init_image, **overrides)
        return self._unary(self._stub.SubmitJob, submit_request(request, request_id), timeout_s)

    def watch(self, job_id: str, after: int = 0, timeout_s: float | None = None) -> Iterator[pb.JobEvent]:
        """The job's events numbered after ``after`` (``WatchJob``): the stored ones, then live ones, until the
        job's last. Closing the iterator early leaves the job running; watch again with ``after`` = the last
        ``number`` seen to miss nothing and see nothing twice. Heartbeats have number 0.

        Raises:
            NSTError: NOT_FOUND (no such job), or the stream broke (UNAVAILABLE: reattach).
        """
        timeout = check_timeout(timeout_s)
        call = self._job_stub(job_id).WatchJob(pb.WatchJobRequest(job_id=job_id, after=after), timeout=timeout,
                                               metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise self._job_error(job_id, error) from None
        finally:
            call.cancel()

    def _job_unary(self, method: str, job_id: str, request, timeout_s: float | None):
        """A unary call about ``job_id``, on its replica (:meth:`_job_stub`)."""
        timeout = check_timeout(timeout_s)
        try:
            return getattr(self._job_stub(job_id), method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._job_error(job_id, error) from None

    def _job_error(self, job_id: str, error: grpc.RpcError) -> NSTError:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self._forget_route(job_id)
        return self._error(error)

    def job(self, job_id: str, timeout_s: float | None = 30.0) -> pb.JobStatus:
        """Where the job stands (``GetJob``): state, progress, timings, costs, error. Raises NSTError (NOT_FOUND)."""
        return self._job_unary("GetJob", job_id, pb.GetJobRequest(job_id=job_id), timeout_s)

    def result(self, job_id: str, timeout_s: float | None = None) -> bytes:
        """The result PNG of a SUCCEEDED job (``GetJobResult``, its chunks joined).

        Raises:
            NSTError: NOT_FOUND (no such job, or expired), FAILED_PRECONDITION (the job has no result: the message
                says its state).
        """
        timeout = check_timeout(timeout_s)
        call = self._job_stub(job_id).GetJobResult(pb.GetJobResultRequest(job_id=job_id), timeout=timeout,
                                                   metadata=self._metadata)
        try:
            return b"".join(chunk.data for chunk in call)
        except grpc.RpcError as error:
            raise self._job_error(job_id, error) from None

    def cancel(self, job_id: str, timeout_s: float | None = 30.0) -> pb.JobStatus:
        """Cancel the job (``CancelJob``): a queued one at once, a running one within one iteration; a finished
        one is left as it is. Returns its status after the request. Raises NSTError (NOT_FOUND)."""
        return self._job_unary("CancelJob", job_id, pb.CancelJobRequest(job_id=job_id), timeout_s)

    def jobs(self, state: str | int | None = None, page_size: int = 0,
             timeout_s: float | None = 30.0) -> Iterator[pb.JobStatus]:
        """Every job the server holds (``ListJobs``, page after page), oldest submission first; ``state``: only
        those in it (:data:`JOB_STATES`). On a target of many replicas, every replica's jobs, replica after
        replica (one that does not answer is left out, unless none answers). Raises NSTError; ValueError for an
        unknown ``state``."""
        number = job_state(state)
        stubs = self._replica_stubs()
        unreachable: list[NSTError] = []
        for stub in stubs:
            request = pb.ListJobsRequest(page_size=page_size, state=number)
            try:
                while True:
                    page = self._unary(stub.ListJobs, request, timeout_s)
                    yield from page.jobs
                    if not page.next_page_token:
                        break
                    request.page_token = page.next_page_token
            except NSTError as error:
                if len(stubs) == 1 or error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                unreachable.append(error)
        if len(unreachable) == len(stubs):
            raise unreachable[0]
