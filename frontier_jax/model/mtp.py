"""Multi-token prediction (V3 report, Sec. 2.2, eqs. 21-25).

Depth k = 1..D predicts token t_{i+k+1} from position i:
    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})]      M_k [2d, d]
    h_i^k  = TRM_k(h'_i^k)                                           (one MoE block)
    P_{i+k+1}^k = OutHead(RMSNorm_k(h_i^k))
with h^0 the main model's last hidden states (before its final norm), Emb and OutHead shared
with the main model.  The concatenation order [embedding ; hidden] is the released
checkpoints' (`eh_proj`).  Sequences keep length T: position i's embedding input is the
token k places ahead (rolled), and targets past the row or crossing a document boundary are
masked by the loss (`frontier_jax.train.losses`).

The D modules are stacked and applied with `lax.scan` over depth (carry: h^{k-1}).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.block import Block, SequenceInputs, prepend_logical_axis
from frontier_jax.model.config import ModelConfig
from frontier_jax.model.layers import Linear, RMSNorm
from frontier_jax.model.moe import MoEStats
from frontier_jax.precision import PrecisionPolicy


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, policy: PrecisionPolicy, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.emb_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self.proj = Linear((2 * d,), (d,), ("concat_embed", "embed"), name="mtp.proj",
                           std=cfg.init_std, policy=policy, rngs=rngs)
        self.block = Block(cfg, moe=True, policy=policy, rngs=rngs)
        self.out_norm = RMSNorm(d, eps=cfg.rms_norm_eps)

    def __call__(self, h_prev: jax.Array, emb_ahead: jax.Array, inputs: SequenceInputs):
        """h_prev [B, T, d], emb_ahead = Emb(t_{i+k}) [B, T, d] -> (h^k, RMSNorm_k(h^k), stats)."""
        x = jnp.concatenate([self.emb_norm(emb_ahead), self.hidden_norm(h_prev).astype(emb_ahead.dtype)], -1)
        h, stats = self.block(self.proj(x), inputs)
        return h, self.out_norm(h), stats


class MTPStack(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, policy: PrecisionPolicy, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.mtp_depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(depth_rngs: nnx.Rngs) -> MTPModule:
            return MTPModule(cfg, policy=policy, rngs=depth_rngs)

        self.modules = create(rngs)
        prepend_logical_axis(self.modules, "layers")

    def __call__(self, h0: jax.Array, emb_ahead: jax.Array, inputs: SequenceInputs
                 ) -> tuple[jax.Array, MoEStats]:
        """h0 [B, T, d], emb_ahead [D, B, T, d] (Emb of tokens k ahead, k = 1..D)
        -> (normed hidden states [D, B, T, d] to feed the shared head, stats [D, ...])."""
        graphdef, state = nnx.split(self.modules)

        def body(h, xs):
            depth_state, emb = xs
            h, normed, stats = nnx.merge(graphdef, depth_state)(h, emb, inputs)
            return h, (normed, stats)

        _, (normed, stats) = jax.lax.scan(body, h0, (state, emb_ahead))
        return normed, stats
