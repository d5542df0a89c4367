"""Job ids of the job API, shared by the server (which makes them) and the clients (which route by them).

A job id is 32 hex digits (128 random bits, :func:`secrets.token_hex`), prefixed on a fleet with the name of the
replica that owns the job and a dot: ``nst-1.3f9c…``. The name is a DNS label (RFC 1123: ``a-z``, ``0-9`` and
``-``, at most 63 characters), the pod's name in a Kubernetes StatefulSet, so that a client that reaches the
fleet through its headless Service (``dns:///nst-headless.NS.svc.cluster.local:50051``) finds the owner as
``nst-1.nst-headless.NS.svc.cluster.local``; clients of a list of addresses ask each one (``GetJob``) and remember
the answer. A job id without a prefix belongs to a server started without ``--replica-name``.
"""

from __future__ import annotations

import re
import secrets

#: A replica name: an RFC 1123 DNS label in lower case.
REPLICA_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: The random part of a job id: 32 lower-case hex digits.
JOB_TOKEN = re.compile(r"[0-9a-f]{32}")


def check_replica_name(name: str) -> str:
    """``name`` when it is empty (no prefix) or an RFC 1123 DNS label; else ValueError naming ``--replica-name``."""
    if name and not REPLICA_NAME.fullmatch(name):
        raise ValueError(f"--replica-name {name!r}: expected a DNS label (lower-case letters, digits and '-', at most "
                         "63 characters, a letter or digit at each end), e.g. the pod's name nst-0")
    return name


def new_job_id(replica_name: str = "") -> str:
    """A new job id: ``NAME.`` (the owning replica, when named) then 32 hex digits, 128 random bits."""
    token = secrets.token_hex(16)
    return f"{replica_name}.{token}" if replica_name else token


def job_owner(job_id: str) -> str:
    """The replica name inside ``job_id`` (``nst-1`` of ``nst-1.3f9c…``); empty when it has none, or when the id
    is not one this module makes."""
    owner, dot, token = job_id.rpartition(".")
    if dot and REPLICA_NAME.fullmatch(owner) and JOB_TOKEN.fullmatch(token):
        return owner
    return ""


__all__ = ["check_replica_name", "job_owner", "new_job_id"]
