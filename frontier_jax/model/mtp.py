"""Multi-token prediction (V3 report, Sec. 2.2, eqs. 21-25).

Depth k = 1..D predicts token t_{i+k+1} from position i:
    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(g_i^{k-1})]      M_k [2d, d]
    h_i^k  = TRM_k(h'_i^k)                                           (one MoE block)
    g_i^k  = RMSNorm_k(h_i^k),   P_{i+k+1}^k = OutHead(g_i^k)
with g^0 = RMSNorm_final(h^L) the main model's *final-normed* last hidden state (the tensor its
own head reads) and depth k > 1 fed the previous depth's normalised output g^{k-1}: what
transformers' `MtpModel`, vLLM and SGLang feed the released V3/R1 MTP weights.  Emb and
OutHead are shared with the main model.  The concatenation order [embedding ; hidden] is the
released checkpoints' (`eh_proj`).  Sequences keep length T: position i's embedding input is the
token k places ahead (rolled), and targets past the row or crossing a document boundary are
masked by the loss (`frontier_jax.train.losses`).

The D modules are stacked and applied with `lax.scan` over depth (carry: g^{k-1}).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.block import Block, SequenceInputs, prepend_logical_axis
from frontier_jax.model.config import ImplConfig, ModelConfig
from frontier_jax.model.extend_context import ExtendContext
from frontier_jax.model.latent_cache import LatentCache
from frontier_jax.model.layers import Linear, RMSNorm
from frontier_jax.model.moe import MoEStats
from frontier_jax.ops.dispatch import ExpertDispatcher, LocalExperts
from frontier_jax.precision import PrecisionPolicy


class MTPModule(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        policy: PrecisionPolicy,
        impl: ImplConfig = ImplConfig(),
        experts: ExpertDispatcher = LocalExperts(),
        rngs: nnx.Rngs,
    ):
        d = cfg.hidden_size
        self.emb_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self.proj = Linear(
            (2 * d,),
            (d,),
            ("concat_embed", "embed"),
            name="mtp.proj",
            std=cfg.init_std,
            policy=policy,
            rngs=rngs,
        )
        self.block = Block(cfg, moe=True, policy=policy, impl=impl, experts=experts, rngs=rngs)
        self.out_norm = RMSNorm(d, eps=cfg.rms_norm_eps)

    def __call__(self, g_prev: jax.Array, emb_ahead: jax.Array, inputs: SequenceInputs):
        """g_prev = g^{k-1} [B, T, d], emb_ahead = Emb(t_{i+k}) [B, T, d] -> (g^k [B, T, d], stats)."""
        x = jnp.concatenate([self.emb_norm(emb_ahead), self.hidden_norm(g_prev).astype(emb_ahead.dtype)], -1)
        h, stats = self.block(self.proj(x), inputs)
        return self.out_norm(h), stats

    def extend(
        self,
        g_prev: jax.Array,
        emb_ahead: jax.Array,
        inputs: SequenceInputs,
        cache: LatentCache,
        layer,
        ctx: ExtendContext,
    ) -> tuple[jax.Array, LatentCache]:
        """`__call__` over T new positions per row attending to this depth's cached positions
        (`Block.extend`, cache layer `layer`) -> (g^k [B, T, d], cache)."""
        x = jnp.concatenate([self.emb_norm(emb_ahead), self.hidden_norm(g_prev).astype(emb_ahead.dtype)], -1)
        h, cache, _ = self.block.extend(self.proj(x), inputs, cache, layer, ctx)
        return self.out_norm(h), cache


class MTPStack(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        policy: PrecisionPolicy,
        impl: ImplConfig = ImplConfig(),
        experts: ExpertDispatcher = LocalExperts(),
        rngs: nnx.Rngs,
    ):
        @nnx.split_rngs(splits=cfg.mtp_depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(depth_rngs: nnx.Rngs) -> MTPModule:
            return MTPModule(cfg, policy=policy, impl=impl, experts=experts, rngs=depth_rngs)

        self.modules = create(rngs)
        prepend_logical_axis(self.modules, "mtp_layers")

    def __call__(
        self, g0: jax.Array, emb_ahead: jax.Array, inputs: SequenceInputs
    ) -> tuple[jax.Array, MoEStats]:
        """g0 = RMSNorm_final(h^L) [B, T, d], emb_ahead [D, B, T, d] (Emb of tokens k ahead,
        k = 1..D) -> (g^1..g^D [D, B, T, d] to feed the shared head, stats [D, ...])."""
        graphdef, state = nnx.split(self.modules)

        def body(g, xs):
            depth_state, emb = xs
            g, stats = nnx.merge(graphdef, depth_state)(g, emb, inputs)
            return g, (g, stats)

        _, (normed, stats) = jax.lax.scan(body, g0, (state, emb_ahead))
        return normed, stats
