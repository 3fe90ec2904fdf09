"""The DeepSeek-V3-style model.

    h^0 = Emb(t)                                          [B, T, d]
    h   = MoE-blocks(dense-blocks(h^0))                   first_k_dense dense, the rest MoE
    g   = RMSNorm(h)                                      [B, T, d]  the final-normed hidden state
    MTP depths k = 1..D continue from g (`mtp.py`)        g^k [D, B, T, d]
    model.head lm:     logits = OutHead(g)                [B, T, vocab] (fp32), MTP: OutHead(g^k)
    model.head scalar: v_s = g_{t_s} . w at each sequence's last token t_s (`reward.py`)

`model.hidden(...)` returns g, the MTP depths' g^k and the per-layer MoE statistics that training
needs (expert loads, balance loss, drops); with `routed_experts` [B, T, L_moe, K] (routing replay,
e.g. the experts the inference engine routed each token to, `Completion.routed_experts`) the MoE
layers run those experts, gated by the current routers, instead of selecting their own; `model.output_head()` reads logits, log-probabilities
of targets or values off them (`head.py`).  `model(input_ids)` returns logits, `model.forward(...)`
logits and MTP logits with the statistics, `model.values(...)` a scalar head's values.  `hidden` is
`front` (embedding + dense prefix), `moe_layers`, `back` (final norm, MTP): the three parts a
pipeline puts in front of its first chunk, into its chunks and after its last chunk.  Build it
with `model.build_model`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.block import LayerStack, SequenceInputs
from frontier_jax.model.config import Head, ImplConfig, ModelConfig
from frontier_jax.model.extend_context import ExtendContext
from frontier_jax.model.head import OutputHead
from frontier_jax.model.latent_cache import ModelCache
from frontier_jax.model.layers import Embed, LMHead, RMSNorm
from frontier_jax.model.moe import MoEStats
from frontier_jax.model.mtp import MTPStack
from frontier_jax.model.reward import ScalarHead
from frontier_jax.model.routing import ExpertBias
from frontier_jax.ops.dispatch import ExpertDispatcher, LocalExperts
from frontier_jax.parallel.rules import constrain
from frontier_jax.precision import PrecisionPolicy, get_policy


class HiddenOutput(NamedTuple):
    hidden: jax.Array  # g [B, T, d]: the final-normed hidden state every head reads
    mtp_hidden: jax.Array | None  # g^k [D, B, T, d]; depth k predicts t_{i+k+1}
    moe_stats: MoEStats | None  # main-model MoE layers, stacked [L_moe, ...]
    mtp_stats: MoEStats | None  # MTP blocks, stacked [D, ...]


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
        lm = cfg.head == Head.lm
        self.head = (
            LMHead(cfg.hidden_size, cfg.vocab_size, std=cfg.init_std, policy=policy, rngs=rngs)
            if lm and not cfg.tie_embeddings
            else None
        )
        self.score = None if lm else ScalarHead(cfg.hidden_size, std=cfg.init_std, rngs=rngs)
        self.mtp = (
            MTPStack(cfg, policy=policy, impl=impl, experts=experts, rngs=rngs) if cfg.mtp_depth else None
        )

    def output_head(self) -> OutputHead:
        """What reads this model's final-normed hidden state: logits, log-probabilities, values."""
        return OutputHead(self.cfg, self.embed, self.head, self.score)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Shared output head on already-normalised hidden states [..., d] -> [..., vocab]."""
        return self.output_head().logits(h)

    def sequence_inputs(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        routed_experts: jax.Array | None = None,
    ) -> SequenceInputs:
        """The per-token inputs every block reads, with `forward`'s defaults filled in."""
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if token_mask is None:
            token_mask = (
                jnp.ones((b, t), jnp.int32) if segment_ids is None else (segment_ids != 0).astype(jnp.int32)
            )
        return SequenceInputs(positions, segment_ids, token_mask, routed_experts)

    def hidden(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        token_mask: jax.Array | None = None,
        with_mtp: bool = True,
        routed_experts: jax.Array | None = None,
    ) -> HiddenOutput:
        """input_ids [B, T] int32; positions [B, T] (default 0..T-1); segment_ids [B, T] document
        ids with 0 = padding, or None for unmasked packing (plain causal attention);
        token_mask [B, T]: tokens counted in the MoE statistics (expert loads, balance loss),
        default segment_ids != 0 (all tokens without segment ids); routed_experts
        [B, T, L_moe, K] int32 or None: routing replay, the experts MoE layer l (in model order,
        dense prefix and MTP modules not counted) runs token [b, t] on, ids in [0, N_r) (module
        docstring); the MoE statistics then count these selections."""
        inputs = self.sequence_inputs(input_ids, positions, segment_ids, token_mask, routed_experts)
        h = self.front(input_ids, inputs)
        moe_stats = None
        if self.moe_layers is not None:
            h, moe_stats = self.moe_layers(h, inputs)
        g, mtp_g, mtp_stats = self.back(h, input_ids, inputs, with_mtp=with_mtp)
        return HiddenOutput(g, mtp_g, moe_stats, mtp_stats)

    def forward(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        token_mask: jax.Array | None = None,
        with_mtp: bool = True,
        routed_experts: jax.Array | None = None,
    ) -> ModelOutput:
        """`hidden` read by the LM head: logits [B, T, vocab] and MTP logits [D, B, T, vocab]."""
        out = self.hidden(
            input_ids,
            positions,
            segment_ids,
            token_mask=token_mask,
            with_mtp=with_mtp,
            routed_experts=routed_experts,
        )
        head = self.output_head()
        mtp_logits = None if out.mtp_hidden is None else head.logits(out.mtp_hidden)
        return ModelOutput(head.logits(out.hidden), mtp_logits, out.moe_stats, out.mtp_stats)

    def values(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        segments: int = 1,
    ) -> tuple[jax.Array, jax.Array]:
        """A scalar head's (values [B, S] fp32, present [B, S] bool): sequence s of each row (segment
        id s + 1; the whole row without segment ids) read at its last token (`reward.py`)."""
        g = self.hidden(input_ids, positions, segment_ids, with_mtp=False).hidden
        return self.output_head().segment_values(g, segment_ids, segments)

    def front(self, input_ids: jax.Array, inputs: SequenceInputs) -> jax.Array:
        """h = dense-blocks(Emb(t)): input_ids [B, T] -> [B, T, d]."""
        h = constrain(self.embed(input_ids), ("batch", "seq", "embed"))
        if self.dense_layers is not None:
            h, _ = self.dense_layers(h, inputs)
        return h

    def back(
        self, h: jax.Array, input_ids: jax.Array, inputs: SequenceInputs, *, with_mtp: bool = True
    ) -> tuple[jax.Array, jax.Array | None, MoEStats | None]:
        """The last blocks' output h [B, T, d] -> (g = RMSNorm(h) [B, T, d], the MTP depths' g^k
        [D, B, T, d] or None, MTP MoE statistics [D, ...] or None)."""
        g = self.final_norm(h)
        if self.mtp is None or not with_mtp:
            return g, None, None
        ahead = jnp.stack([jnp.roll(input_ids, -k, axis=1) for k in range(1, self.cfg.mtp_depth + 1)])
        normed, mtp_stats = self.mtp(g, self.embed(ahead), inputs)
        return g, normed, mtp_stats

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

    def expert_loads(self, out: HiddenOutput | ModelOutput) -> dict:
        """The per-layer expert loads of `out` laid out like this model's expert biases
        (`nnx.state(self, ExpertBias)` as a pure dict): each stack's bias [L, N_r] gets its
        stack's loads [L, N_r], the tree that the loss-free bias update adds to.  A stack the
        forward did not run (the MTP modules with with_mtp=False) gets zero loads, under which
        the bias update leaves its biases as they are."""
        stats = {"moe_layers": out.moe_stats, "mtp": out.mtp_stats}
        biases = nnx.to_pure_dict(nnx.state(self, ExpertBias))
        return {
            stack: jax.tree.unflatten(
                jax.tree.structure(tree),
                [
                    jnp.zeros_like(b) if stats[stack] is None else stats[stack].load
                    for b in jax.tree.leaves(tree)
                ],
            )
            for stack, tree in biases.items()
        }  # one router bias per stack

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """input_ids [B, T] -> next-token logits [B, T, vocab] (fp32)."""
        return self.forward(input_ids, positions, segment_ids, with_mtp=False).logits
