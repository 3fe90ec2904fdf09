"""Shared helpers for the model tests: tiny configs, modules with random (non-default) parameters
built without compiling initialisers, and float64 copies of their parameters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.model.config import ModelConfig, RopeScalingConfig
from frontier_jax.precision import get_policy

# XLA:CPU options that cut compile time of these tiny programs by ~3x (compile dominates the
# test time); they change fp32 rounding only at the 1e-7 level.
_WANTED_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


def _supported(options: dict) -> dict:
    """The options this jaxlib / backend accepts (unknown ones are an error at compile time)."""
    kept = {}
    for key, value in options.items():
        try:
            jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options={key: value})
        except Exception:  # noqa: BLE001 - option unknown to this XLA build
            continue
        kept[key] = value
    return kept


FAST_COMPILE = _supported(_WANTED_OPTIONS)


def fast_jit(fn, **kwargs):
    """jax.jit with the fast-compile options."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def jit(fn):
    """Jits fn(module, *args) (module not mutated, args positional pytrees or None) with the
    fast-compile options; the module's graph definition is a static argument."""

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
    def pure(graphdef, state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    @functools.wraps(fn)
    def wrapper(module, *args):
        graphdef, state = nnx.split(module)
        return pure(graphdef, state, *args)

    return wrapper


FP32 = get_policy("fp32")
BF16 = get_policy("bf16")

# YaRN with a small original context so that the ramp is active for d_R = 8, and
# mscale != mscale_all_dim so both the cos/sin amplitude and the softmax-scale correction are
# exercised.
TINY_YARN = RopeScalingConfig(
    type="yarn",
    factor=4.0,
    original_max_position_embeddings=64,
    beta_fast=4.0,
    beta_slow=0.5,
    mscale=1.0,
    mscale_all_dim=0.5,
)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=48,
        hidden_size=32,
        num_layers=3,
        first_k_dense=1,
        dense_ffn_dim=40,
        num_heads=2,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=6,
        rope_scaling=TINY_YARN,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_ffn_dim=12,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        mtp_depth=1,
    )
    base.update(overrides)
    return ModelConfig(**base).validate()


def _random_value(path, shape, rng: np.random.Generator) -> np.ndarray:
    name = str(path[-1])
    if name == "scale":  # RMSNorm weights: around 1 but not 1, so that they are exercised
        value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name == "bias":  # routing bias: large enough to change selections
        value = 0.1 * rng.standard_normal(shape)
    elif name == "embedding":
        value = rng.standard_normal(shape)
    else:
        value = 0.3 * rng.standard_normal(shape)
    return value.astype(np.float32)


def randomize(module: nnx.Module, seed: int) -> nnx.Module:
    """Overwrites every variable of `module` (parameters and expert biases) with seeded random
    values of O(1) activations scale, in place; returns the module."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module)
    pure = state.to_pure_dict()
    new = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(_random_value([p.key for p in path], leaf.shape, rng)), pure
    )
    state.replace_by_pure_dict(new)
    nnx.update(module, state)
    return module


def build(factory, seed: int = 0) -> nnx.Module:
    """Creates the module abstractly (no initialiser is compiled) and fills it with random values."""
    return randomize(nnx.eval_shape(factory), seed)


def params_f64(module: nnx.Module) -> dict:
    """Nested dict of float64 copies of all variables of `module`."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.state(module).to_pure_dict())


def copy_state(src: nnx.Module, dst: nnx.Module) -> nnx.Module:
    nnx.update(dst, nnx.state(src))
    return dst


def assert_close(actual, expected, rtol, atol, err_msg=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(expected, np.float64),
        rtol=rtol,
        atol=atol,
        err_msg=err_msg,
    )


# --------------------------------------------------------------------------- whole models

B, T = 2, 8


def token_ids(cfg, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


# packed rows: two documents + padding, and two documents filling the row
PACKED_SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 2, 2]], np.int32)
PACKED_POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]], np.int32)


@jit
def forward(model, ids, positions=None, segment_ids=None):
    return model.forward(ids, positions, segment_ids)
