"""Sharded model == single-device model, for several mesh layouts on 8 fake CPU devices.

For each layout: loss and gradients of the sharded jitted step equal the unsharded fp32
computation (rtol 1e-5 / atol 1e-6: only the reduction order differs), and every parameter
is laid out as the rules table says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.config import load_config
from frontier_jax.parallel.mesh import build_mesh, state_shardings
from frontier_jax.parallel.rules import DEFAULT_RULES, logical_to_spec, use_sharding
from frontier_jax.train.objectives.pretrain import BATCH_KEYS, TokenBatch
from frontier_jax.train.step import Trainer

TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.first_k_dense=1",
    "model.num_heads=4",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=8",
    "model.n_routed_experts=8",
    "model.moe_ffn_dim=16",
    "model.num_experts_per_tok=2",
    "model.n_group=4",
    "model.topk_group=2",
    "model.mtp_depth=1",
    "model.dense_ffn_dim=64",
    "model.init_std=0.2",
    "train.seq_len=16",
    "train.global_batch=8",
]

LAYOUTS = {
    "data": {"mesh.data": 8},
    "fsdp": {"mesh.data": 1, "mesh.fsdp": 8},
    "tensor": {"mesh.data": 2, "mesh.tensor": 4},
    "expert": {"mesh.data": 1, "mesh.expert": 8},
    "expert_x_data": {"mesh.data": 2, "mesh.expert": 4},
    "expert_x_tensor": {"mesh.data": 2, "mesh.expert": 2, "mesh.tensor": 2},
    "fsdp_x_expert": {"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 4},
}


def _batch(cfg):
    rng = np.random.default_rng(0)
    b, t = cfg.train.global_batch, cfg.train.seq_len
    ids = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((b, t), np.int32),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }


def _loss_and_grads(trainer, state, batch):
    mb = TokenBatch(*(jnp.asarray(batch[k]) for k in BATCH_KEYS), token_mask=jnp.asarray(batch["loss_mask"]))
    norm = trainer.objective.normalisers(mb, 1)
    loss, grads = jax.value_and_grad(
        lambda params: trainer.objective(trainer.model(params, state.biases), mb, norm)[0]
    )(state.params)
    return loss, grads


@pytest.fixture(scope="module")
def reference():
    cfg = load_config(None, TINY + ["mesh.data=8"])
    trainer = Trainer(cfg)
    state = trainer.init(0)
    batch = _batch(cfg)
    loss, grads = jax.jit(lambda s, b: _loss_and_grads(trainer, s, b))(state, batch)
    return state, batch, loss, grads


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_loss_and_grads_equal_single_device(layout, reference):
    state, batch, ref_loss, ref_grads = reference
    cfg = load_config(None, TINY + [f"{k}={v}" for k, v in LAYOUTS[layout].items()])
    mesh = build_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    param_shardings = state_shardings(trainer.abstract_params, mesh)
    params = jax.device_put(state.params, param_shardings)
    sharded_state = state.replace(params=params)

    def step(s, b):
        with use_sharding(mesh):
            return _loss_and_grads(trainer, s, b)

    loss, grads = jax.jit(step)(sharded_state, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # every parameter is laid out as the rules say
    abstract = jax.tree.leaves(trainer.abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for var, leaf in zip(abstract, jax.tree.leaves(params)):
        expected = logical_to_spec(var.get_metadata()["logical_axes"], DEFAULT_RULES)
        assert leaf.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, expected), leaf.ndim)
