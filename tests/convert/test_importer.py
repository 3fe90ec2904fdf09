"""The streamed import: parameters placed with their target shardings on a mesh, host memory
bounded by a few tensors, dtype given as a string or a dtype object."""

import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from frontier_jax.convert import from_hf
from frontier_jax.parallel.rules import DEFAULT_RULES, MESH_AXES, logical_to_spec

from .helpers import assert_same_params, tiny_hf_model

# "tens of MB": 8 layers (1 dense, 7 MoE of 16 experts), about 53 MiB of float32 parameters
# whose largest single tensor is 2 MiB.
MEDIUM = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=8,
    n_routed_experts=16,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
)


def _mesh(**sizes):
    """A mesh over the 8 fake devices as `parallel.mesh.build_mesh` makes it (Auto axes)."""
    return jax.make_mesh(
        tuple(sizes.get(a, 1) for a in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=jax.devices()[:8],
    )


def _variables(model):
    return dict(nnx.to_flat_state(nnx.state(model)))


def test_import_onto_tensor2_expert4_mesh_equals_one_device_import_with_rule_shardings(saved_tiny):
    path, _ = saved_tiny
    mesh = _mesh(expert=4, tensor=2)
    _, single = from_hf(path)
    _, sharded = from_hf(path, mesh=mesh)
    assert_same_params(sharded, single)
    for var_path, var in _variables(sharded).items():
        value = var[...]
        want = logical_to_spec(var.get_metadata()["logical_axes"], DEFAULT_RULES)
        assert value.sharding.mesh == mesh and value.sharding.spec == want, ".".join(map(str, var_path))
    experts = sharded.moe_layers.blocks.ffn.experts.w_gate[...]  # [layers, E, d, f]: E over 4, f over 2
    layers, e, d, f = experts.shape
    assert {s.data.shape for s in experts.addressable_shards} == {(layers, e // 4, d, f // 2)}
    assert len({str(s.index) for s in experts.addressable_shards}) == 8  # 8 distinct pieces
    single_device = _variables(single)[("embed", "embedding")][...]
    assert len(single_device.sharding.device_set) == 1


def test_import_with_rules_that_replicate_keeps_every_parameter_whole_on_every_device(saved_tiny):
    path, _ = saved_tiny
    rules = {name: () for name in DEFAULT_RULES}
    _, model = from_hf(path, mesh=_mesh(expert=4, tensor=2), rules=rules)
    value = model.moe_layers.blocks.ffn.experts.w_down[...]
    assert value.sharding.is_fully_replicated and len(value.addressable_shards) == 8


def test_mesh_that_does_not_divide_a_parameter_is_an_error_naming_it(saved_tiny):
    path, _ = saved_tiny
    with pytest.raises(ValueError, match="does not split over mesh axes"):
        from_hf(path, mesh=_mesh(tensor=8))  # 2 heads


@pytest.mark.parametrize(
    "dtype, policy",
    [("bfloat16", "bf16"), (jnp.bfloat16, "bf16"), (jnp.float32, "fp32"), (np.dtype("float32"), "fp32")],
)
def test_dtype_is_accepted_as_a_string_or_a_dtype_object(saved_tiny, dtype, policy):
    _, model = from_hf(saved_tiny[0], dtype=dtype)
    assert model.policy.name == policy and model.embed.embedding[...].dtype == jnp.float32


def test_unsupported_dtype_is_an_error_naming_the_allowed_ones(saved_tiny):
    with pytest.raises(ValueError, match="dtype=.*float16.* allowed: float32, bfloat16"):
        from_hf(saved_tiny[0], dtype=jnp.float16)


@pytest.fixture(scope="module")
def saved_medium(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("medium"))
    tiny_hf_model(**MEDIUM).save_pretrained(path)
    return path


@pytest.mark.parametrize("mesh_sizes", [{}, {"expert": 4, "tensor": 2}])
def test_peak_host_memory_of_an_import_stays_well_under_the_model_size(saved_medium, mesh_sizes):
    """numpy's host allocations, traced by tracemalloc (device buffers are not numpy's, even on
    CPU).  Holding the whole model on the host, as a non-streamed import does, peaks above its size."""
    mesh = _mesh(**mesh_sizes) if mesh_sizes else None
    from_hf(saved_medium, mesh=mesh)  # compile the placement functions outside the measurement
    tracemalloc.start()
    try:
        _, model = from_hf(saved_medium, mesh=mesh)
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    model_bytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(model)))
    print(f"model {model_bytes / 2**20:.1f} MiB, peak host (numpy) {peak / 2**20:.1f} MiB")
    assert model_bytes > 40 * 2**20
    assert peak < model_bytes / 4
