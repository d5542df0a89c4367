"""Helpers for tests that start their own ``nst-server`` process (port 0, metrics port 0, logs to a file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nst_client import NSTClient


@dataclass
class ServerProcess:
    process: subprocess.Popen
    target: str                 # host:port
    metrics_url: str | None     # http://host:port/metrics, with --metrics-port
    log_path: Path              # the server's stderr (its log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the server's Prometheus metrics (0.0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def rss_kib(self) -> int:
        """Resident set size of the server process, KiB (``VmRSS`` of /proc/PID/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout_s``); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def launch(model: Path, log_path: Path, args: list[str] = (), env: dict[str, str] | None = None) -> ServerProcess:
    """Start ``nst-server --port 0 --metrics-port 0 ARGS``; return once it has bound its port (it is then
    NOT_SERVING until the model is loaded and warmed up).

    Raises:
        RuntimeError: the server exited before binding.
    """
    command = [sys.executable, "-m", "nst_server.cli", "--model", str(model), "--port", "0",
               "--metrics-port", "0", *args]
    log_file = open(log_path, "w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True,
                               env={**os.environ, **(env or {})})
    log_file.close()
    metrics_url = target = None
    assert process.stdout is not None
    for line in process.stdout:
        if "metrics on" in line:
            metrics_url = line.strip().rsplit(" ", 1)[-1]
        if "bound to" in line:
            target = line.split("bound to ", 1)[1].split(";", 1)[0]
            break
    if target is None:
        raise RuntimeError(f"nst-server exited with code {process.wait()}: {log_path.read_text()[-3000:]}")
    return ServerProcess(process, target, metrics_url, log_path)


def wait_listening(server: ServerProcess, client_options: dict | None = None, timeout_s: float = 120.0) -> None:
    """Wait for the "listening on" line and for health SERVING (``client_options``: ``tls_ca``, ``token`` …)."""
    for line in server.process.stdout:
        if "listening on" in line:
            break
    else:
        raise RuntimeError(f"nst-server exited with code {server.process.wait()}: {server.log()[-3000:]}")
    with NSTClient(server.target, **(client_options or {})) as client:
        client.wait_until_serving(timeout_s=timeout_s)


def start(model: Path, log_path: Path, args: list[str] = (), env: dict[str, str] | None = None,
          client_options: dict | None = None, timeout_s: float = 120.0) -> ServerProcess:
    """:func:`launch`, then :func:`wait_listening`."""
    server = launch(model, log_path, args, env)
    wait_listening(server, client_options, timeout_s)
    return server


# Run by ``python -c`` in the child: set the limits and signal dispositions, then exec the command (both survive
# exec). Tests use this instead of ``subprocess``'s ``preexec_fn``: that runs Python between fork and exec in a
# child of a process that holds gRPC channels, where gRPC's after-fork handler restarts its poller thread and
# subprocess's ``close_fds`` then closes the epoll descriptor under it ("epoll_wait error: Bad file descriptor",
# SIGABRT before the command ever ran: CI, 2026-12-03).
_LAUNCHER = """
import os, resource, signal, sys
limit, sigint, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if limit >= 0:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
if sigint == "default":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execv(argv[0], argv)
"""


def cli_command(args: list[str], file_size_limit: int | None = None, default_sigint: bool = False) -> list[str]:
    """The argv that runs ``python -m nst_client.cli *args`` with, where given, files limited to
    ``file_size_limit`` bytes (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG instead of a kill) and the
    default SIGINT handler (a shell's background job starts with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler)."""
    limit = -1 if file_size_limit is None else file_size_limit
    return [sys.executable, "-c", _LAUNCHER, str(limit), "default" if default_sigint else "inherit",
            sys.executable, "-m", "nst_client.cli", *args]


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns a true value (returned) or ``timeout_s`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def has_ipv6_loopback() -> bool:
    """Whether this machine can bind ``::1`` (tests of IPv6 addresses skip, saying why, where it cannot)."""
    import socket
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False
