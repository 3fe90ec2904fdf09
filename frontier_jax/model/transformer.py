"""The DeepSeek-V3-style language model.

    h^0 = Emb(t)                                          [B, T, d]
    h   = MoE-blocks(dense-blocks(h^0))                   first_k_dense dense, the rest MoE
    logits = OutHead(RMSNorm(h))                          [B, T, vocab] (fp32)
    MTP depths k = 1..D continue from RMSNorm(h) (`mtp.py`) [D, B, T, vocab]

`model(input_ids)` returns logits; `model.forward(...)` also returns the MTP logits and the
per-layer MoE statistics that training needs (expert loads, balance loss, drops).  `forward` is
`front` (embedding + dense prefix), `moe_layers`, `back` (final norm, head, MTP): the three parts
a pipeline puts in front of its first chunk, into its chunks and after its last chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.block import LayerStack, SequenceInputs
from frontier_jax.model.config import ImplConfig, ModelConfig
from frontier_jax.model.extend_context import ExtendContext
from frontier_jax.model.latent_cache import ModelCache
from frontier_jax.model.layers import Embed, LMHead, RMSNorm
from frontier_jax.model.moe import MoEStats
from frontier_jax.model.mtp import MTPStack
from frontier_jax.model.routing import ExpertBias
from frontier_jax.ops.dispatch import ExpertDispatcher, LocalExperts
from frontier_jax.parallel.rules import constrain
from frontier_jax.precision import PrecisionPolicy, get_policy


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] fp32
    mtp_logits: jax.Array | None  # [D, B, T, vocab] fp32; depth k predicts t_{i+k+1}
    moe_stats: MoEStats | None  # main-model MoE layers, stacked [L_moe, ...]
    mtp_stats: MoEStats | None  # MTP blocks, stacked [D, ...]


class Extended(NamedTuple):
    hidden: jax.Array  # final-normed hidden states g [B, T, d]
    cache: ModelCache  # with the new tokens written
    experts: jax.Array | None  # [L_moe, B, T, K] int32: the experts each MoE layer routed each token to


class Transformer(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        impl: ImplConfig = ImplConfig(),
        policy: PrecisionPolicy | None = None,
        experts: ExpertDispatcher = LocalExperts(),
        rngs: nnx.Rngs,
    ):
        """impl: how it is computed (the run config's `impl:` section: attention core, grouped
        matmul, dispatch, remat); policy: the precision of every projection (default fp32);
        experts: how routed experts are dispatched (default `LocalExperts`;
        `parallel.expert.expert_dispatcher` gives the all-to-all one for a mesh with an `expert`
        axis)."""
        cfg.validate()
        impl.validate()
        policy = policy or get_policy("fp32")
        self.cfg, self.policy = cfg, policy
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, std=cfg.init_std, policy=policy, rngs=rngs)
        stack = dict(policy=policy, impl=impl, rngs=rngs)
        self.dense_layers = (
            LayerStack(cfg, cfg.first_k_dense, moe=False, layer_axis="dense_layers", **stack)
            if cfg.first_k_dense
            else None
        )
        self.moe_layers = (
            LayerStack(cfg, cfg.num_moe_layers, moe=True, layer_axis="layers", experts=experts, **stack)
            if cfg.num_moe_layers
            else None
        )
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.head = (
            None
            if cfg.tie_embeddings
            else LMHead(cfg.hidden_size, cfg.vocab_size, std=cfg.init_std, policy=policy, rngs=rngs)
        )
        self.mtp = (
            MTPStack(cfg, policy=policy, impl=impl, experts=experts, rngs=rngs) if cfg.mtp_depth else None
        )

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Shared output head on already-normalised hidden states [..., d] -> [..., vocab]."""
        return self.embed.attend(h) if self.head is None else self.head(h)

    def sequence_inputs(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        token_mask: jax.Array | None = None,
    ) -> SequenceInputs:
        """The per-token inputs every block reads, with `forward`'s defaults filled in."""
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if token_mask is None:
            token_mask = (
                jnp.ones((b, t), jnp.int32) if segment_ids is None else (segment_ids != 0).astype(jnp.int32)
            )
        return SequenceInputs(positions, segment_ids, token_mask)

    def forward(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        token_mask: jax.Array | None = None,
        with_mtp: bool = True,
    ) -> ModelOutput:
        """input_ids [B, T] int32; positions [B, T] (default 0..T-1); segment_ids [B, T] document
        ids with 0 = padding, or None for unmasked packing (plain causal attention);
        token_mask [B, T]: tokens counted in the MoE statistics (expert loads, balance loss),
        default segment_ids != 0 (all tokens without segment ids)."""
        inputs = self.sequence_inputs(input_ids, positions, segment_ids, token_mask)
        h = self.front(input_ids, inputs)
        moe_stats = None
        if self.moe_layers is not None:
            h, moe_stats = self.moe_layers(h, inputs)
        logits, mtp_logits, mtp_stats = self.back(h, input_ids, inputs, with_mtp=with_mtp)
        return ModelOutput(logits, mtp_logits, moe_stats, mtp_stats)

    def front(self, input_ids: jax.Array, inputs: SequenceInputs) -> jax.Array:
        """h = dense-blocks(Emb(t)): input_ids [B, T] -> [B, T, d]."""
        h = constrain(self.embed(input_ids), ("batch", "seq", "embed"))
        if self.dense_layers is not None:
            h, _ = self.dense_layers(h, inputs)
        return h

    def back(
        self, h: jax.Array, input_ids: jax.Array, inputs: SequenceInputs, *, with_mtp: bool = True
    ) -> tuple[jax.Array, jax.Array | None, MoEStats | None]:
        """The last blocks' output h [B, T, d] -> (logits [B, T, vocab], MTP logits [D, B, T, vocab]
        or None, MTP MoE statistics [D, ...] or None)."""
        h = self.final_norm(h)
        logits = self.logits_from_hidden(h)
        if self.mtp is None or not with_mtp:
            return logits, None, None
        ahead = jnp.stack([jnp.roll(input_ids, -k, axis=1) for k in range(1, self.cfg.mtp_depth + 1)])
        normed, mtp_stats = self.mtp(h, self.embed(ahead), inputs)
        return logits, self.logits_from_hidden(normed), mtp_stats

    def extend(
        self, input_ids: jax.Array, positions: jax.Array, cache: ModelCache, ctx: ExtendContext
    ) -> Extended:
        """T new tokens per row of sequences whose earlier tokens are in the paged latent
        cache (prefill chunks: ctx.absorbed False, decode steps: True, see `MLA.extend`):
        input_ids, positions [B, T] -> `Extended` (final-normed hidden states g [B, T, d], the
        cache with the new tokens written, the MoE layers' routed experts).  Logits:
        `logits_from_hidden(g)`; g also feeds `draft`."""
        inputs = SequenceInputs(positions, None, ctx.token_mask)
        h = constrain(self.embed(input_ids), ("batch", "seq", "embed"))
        dense, moe, experts = cache.dense, cache.moe, None
        if self.dense_layers is not None:
            h, dense, _ = self.dense_layers.extend(h, inputs, dense, ctx)
        if self.moe_layers is not None:
            h, moe, experts = self.moe_layers.extend(h, inputs, moe, ctx)
        return Extended(self.final_norm(h), cache._replace(dense=dense, moe=moe), experts)

    def draft(
        self,
        g0: jax.Array,
        ahead: jax.Array,
        known: jax.Array,
        positions: jax.Array,
        select: jax.Array,
        cache: ModelCache,
        ctx: ExtendContext,
    ) -> tuple[jax.Array, ModelCache]:
        """The MTP chain over T positions per row whose main-model g^0 is known, with the
        MTP caches: depth k at position j reads g^{k-1}_j and Emb(t_{j+k}) (`mtp.py`).
        g0 [B, T, d]; select [B] the row's last position L-2 (t_{L-1} the newest known token);
        ahead [D, B, T] the tokens t_{j+k} where known [D, B, T], elsewhere (t_{L-1+i}, i >= 1)
        the chain's own drafts d_i = depth i's argmax at select, so that depth k computes what
        the training forward computes over t_0 .. t_{L-1}, d_1 .. d_{k-1}
        -> (drafts [B, D] int32: depth k's argmax at select, cache)."""
        inputs = SequenceInputs(positions, None, ctx.token_mask)
        graphdef, state = nnx.split(self.mtp.modules)
        b, t, depths = g0.shape[0], g0.shape[1], self.cfg.mtp_depth
        behind = jnp.arange(t)[None, :] - select[:, None]  # [B, T]: j - (L-2)

        def body(carry, xs):
            g, chain, mtp_cache = carry
            depth_state, depth, ahead_k, known_k = xs  # depth = k - 1
            # an unknown t_{j+k} (j + k > L-1) is d_i, i = j - (L-2) + k - 1: chain column i - 1
            column = jnp.clip(behind + depth - 1, 0, depths - 1)
            tokens = jnp.where(known_k, ahead_k, jnp.take_along_axis(chain, column, axis=1))
            g, mtp_cache = nnx.merge(graphdef, depth_state).extend(
                g, self.embed(tokens), inputs, mtp_cache, depth, ctx
            )
            logits = self.logits_from_hidden(jnp.take_along_axis(g, select[:, None, None], axis=1)[:, 0])
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            chain = jnp.where(jnp.arange(depths)[None, :] == depth, token[:, None], chain)
            # the chain carries g in g0's dtype (the engine's fp32 hidden states), whatever the
            # compute dtype of the modules (bf16 policies return bf16 g)
            return (g.astype(g0.dtype), chain, mtp_cache), None

        chain = jnp.zeros((b, depths), jnp.int32)
        (_, drafts, mtp), _ = jax.lax.scan(
            body, (g0, chain, cache.mtp), (state, jnp.arange(depths), ahead, known)
        )
        return drafts, cache._replace(mtp=mtp)

    def expert_loads(self, out: ModelOutput) -> dict:
        """The per-layer expert loads of `out` laid out like this model's expert biases
        (`nnx.state(self, ExpertBias)` as a pure dict): each stack's bias [L, N_r] gets its
        stack's loads [L, N_r], the tree that the loss-free bias update adds to."""
        stats = {"moe_layers": out.moe_stats, "mtp": out.mtp_stats}
        biases = nnx.to_pure_dict(nnx.state(self, ExpertBias))
        missing = [stack for stack in biases if stats[stack] is None]
        if missing:
            raise ValueError(f"no expert loads of {missing} in this output (forward with with_mtp=True)")
        return {
            stack: jax.tree.unflatten(jax.tree.structure(tree), [stats[stack].load])
            for stack, tree in biases.items()
        }  # one router bias per stack

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """input_ids [B, T] -> next-token logits [B, T, vocab] (fp32)."""
        return self.forward(input_ids, positions, segment_ids, with_mtp=False).logits
