"""Lazy import of tokamax (Google's Pallas kernel library), an optional GPU dependency."""

from __future__ import annotations

import functools


@functools.cache
def tokamax(setting: str):
    """The tokamax module; `setting` names the config field that asked for it (for the error)."""
    try:
        import tokamax as module
    except ImportError as err:
        raise ImportError(
            f"{setting}='tokamax' needs the tokamax package: pip install 'frontier_jax[gpu]' "
            "(Python >= 3.12), or choose another implementation for that setting"
        ) from err
    return module
