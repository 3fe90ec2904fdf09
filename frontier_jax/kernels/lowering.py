"""Where the Pallas kernels run: compiled (Triton / Mosaic GPU) on a GPU, the Pallas
interpreter elsewhere (the CPU tests run every kernel that way)."""

from __future__ import annotations

import jax


def interpret() -> bool:
    """True off the GPU: pass as `pallas_call(..., interpret=interpret())`."""
    return jax.default_backend() != "gpu"
