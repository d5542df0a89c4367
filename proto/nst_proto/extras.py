"""The pip extras of nst-inference: the bare install is the client alone; the export and the server packages
check for theirs when imported, so a console script names what to install instead of failing deep inside an
import."""

from __future__ import annotations

import importlib.util


def require_extra(modules: tuple[str, ...], extra: str) -> None:
    """Raise ModuleNotFoundError naming the pip extra that installs ``modules`` when one of them is missing.

    The bare ``pip install .`` is the client alone; the export and the server need their extras. Checked with
    ``importlib.util.find_spec`` (nothing is imported), so a console script says what to install instead of
    failing deep inside an import.
    """
    missing = [name for name in modules if _find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"{', '.join(missing)} not installed: this needs `pip install -e \".[{extra}]\"` "
                                  f"(or `pip install \"nst-inference[{extra}]\"`)", name=missing[0])


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):          # a module set to None in sys.modules, a broken parent package
        return None
