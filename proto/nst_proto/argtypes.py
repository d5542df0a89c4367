"""argparse types of numeric flags (``nst``, ``nst bench``, ``nst-server``): each accepts its whole documented
range and refuses the rest with a usage error (exit code 2) that argparse prefixes with the flag, e.g.
``argument --timeout-s: must be > 0 s (inf: no deadline), got nan``. Standard library only.

Like ``UINT32``/``UINT64`` of :mod:`nst_client.cli`: a factory returns the parser function, named for argparse's
"invalid <name> value" messages.
"""

from __future__ import annotations

import argparse
import math

from nst_proto import MAX_TIMEOUT_S


def integer(low: int, high: int | None = None, unit: str = ""):
    """argparse type: an integer in ``[low, high]`` (``high`` None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}{unit}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def finite(text: str) -> float:
    """argparse type: a finite float (``nan`` and ``inf`` refused: a job's weights and ratios)."""
    value = _float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def number(low: float, high: float, unit: str = "", low_open: bool = False):
    """argparse type: a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        value = _float(text)
        if not (low < value <= high if low_open else low <= value <= high):      # NaN too
            bounds = (f"more than {low:.10g} and at most {high:.10g}" if low_open
                      else f"between {low:.10g} and {high:.10g}")
            raise argparse.ArgumentTypeError(f"must be {bounds}{unit}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def seconds(text: str) -> float:
    """argparse type: a duration >= 0 s; ``inf`` allowed (no limit)."""
    value = _float(text)
    if not value >= 0:                          # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0 s (inf: no limit), got {text!r}")
    return value


def timeout(text: str) -> float | None:
    """argparse type: a deadline > 0 s; ``inf`` or more than ``MAX_TIMEOUT_S`` (1e9 s): None, no deadline."""
    value = _float(text)
    if not value > 0:                           # NaN too
        raise argparse.ArgumentTypeError(f"must be > 0 s (inf: no deadline), got {text!r}")
    return None if value > MAX_TIMEOUT_S else value


seconds.__name__ = "seconds"
timeout.__name__ = "timeout"
finite.__name__ = "finite"
