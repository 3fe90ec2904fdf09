"""Test-wide setup, before jax is imported anywhere:
* 8 fake CPU devices, so multi-device behaviour is tested for real;
* cheaper XLA CPU compilation (no expensive LLVM passes): tests compile far more than they
  compute, and the numerics compared in tests do not depend on these optimisations."""

import os

_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
