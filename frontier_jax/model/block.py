"""Transformer block and the scanned stack of blocks.

Block (pre-norm):  h = x + MLA(RMSNorm(x));  y = h + FFN(RMSNorm(h))
with FFN a dense SwiGLU (the first `first_k_dense` layers) or DeepSeekMoE.

LayerStack holds L identical blocks as one module whose parameters carry a leading layer axis
(logical name `layers` for the MoE stack, which pipeline stages split; `dense_layers` for the
dense prefix) ([L, ...]), created with `nnx.vmap` and applied layer after layer by `apply_layers`:
with `jax.lax.scan` (`impl.scan_layers=true`: compile time flat in depth) or a Python loop over
the same stacked parameters (false: kept residuals are per-layer buffers instead of [L, ...]
stacks); the remat policy is one knob either way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.config import ImplConfig, ModelConfig
from frontier_jax.model.extend_context import ExtendContext
from frontier_jax.model.latent_cache import LatentCache
from frontier_jax.model.layers import RMSNorm
from frontier_jax.model.mla import MLA
from frontier_jax.model.mlp import SwiGLU
from frontier_jax.model.moe import MoE, MoEStats
from frontier_jax.ops.dispatch import ExpertDispatcher, LocalExperts
from frontier_jax.parallel.rules import constrain
from frontier_jax.precision import PrecisionPolicy
from frontier_jax.precision.recipe import FP8_WEIGHT


class SequenceInputs(NamedTuple):
    """Per-token side inputs shared by every block: positions [B, T] (RoPE), segment_ids
    [B, T] or None (document ids for masked packing), token_mask [B, T] (1 = real token);
    routed_experts [B, T, L, K_r] int32 or None: routing replay, the experts each of the L layers
    of the MoE stack runs each token on (the MoE `LayerStack` reads it, layer l taking
    [:, :, l]; dense layers and the MTP modules route themselves)."""

    positions: jax.Array
    segment_ids: jax.Array | None
    token_mask: jax.Array
    routed_experts: jax.Array | None = None

    def layer_range(self, start, count: int) -> SequenceInputs:
        """These inputs for the `count` MoE layers from layer `start` on (a pipeline chunk's;
        start may be traced): routed_experts[:, :, start : start + count]."""
        if self.routed_experts is None:
            return self
        return self._replace(
            routed_experts=jax.lax.dynamic_slice_in_dim(self.routed_experts, start, count, axis=2)
        )


class Block(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        moe: bool,
        policy: PrecisionPolicy,
        impl: ImplConfig = ImplConfig(),
        experts: ExpertDispatcher = LocalExperts(),
        rngs: nnx.Rngs,
    ):
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = MLA(cfg, policy=policy, attention=impl.attention, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.is_moe = moe
        if moe:
            self.ffn = MoE(cfg, policy=policy, impl=impl, experts=experts, rngs=rngs)
        else:
            self.ffn = SwiGLU(
                cfg.hidden_size,
                cfg.dense_ffn_dim,
                std=cfg.init_std,
                policy=policy,
                rngs=rngs,
                name="dense_ffn",
            )

    def __call__(
        self, x: jax.Array, inputs: SequenceInputs, routed_experts: jax.Array | None = None
    ) -> tuple[jax.Array, MoEStats | None]:
        """x [B, T, d] -> (y [B, T, d], MoEStats or None in a dense block); routed_experts
        [B, T, K_r]: the experts an MoE block replays (`MoE`)."""
        h = x + self.attn(self.attn_norm(x), inputs.positions, inputs.segment_ids)
        return self._ffn_residual(h, lambda u: self.ffn(u, inputs.token_mask, routed_experts))

    def extend(
        self, x: jax.Array, inputs: SequenceInputs, cache: LatentCache, layer, ctx: ExtendContext
    ) -> tuple[jax.Array, LatentCache, jax.Array | None]:
        """The block over T new tokens per row attending to their cached sequence
        (`MLA.extend`): x [B, T, d] -> (y [B, T, d], cache with layer `layer` written, the
        experts each token is routed to [B, T, K] int32 or None in a dense block)."""
        u, cache = self.attn.extend(self.attn_norm(x), inputs.positions, cache, layer, ctx)
        y, experts = self._ffn_residual(x + u, lambda u: self.ffn.routed(u, inputs.token_mask))
        return y, cache, experts

    def _ffn_residual(self, h: jax.Array, moe):
        """h after attention -> (h + FFN(RMSNorm(h)), what `moe` returns besides its output, or
        None in a dense block); moe(u) runs the MoE layer on the normed u."""
        h = constrain(h, ("batch", "seq", "embed"))
        if self.is_moe:
            out, aux = moe(self.ffn_norm(h))
        else:
            out, aux = self.ffn(self.ffn_norm(h)), None
        return constrain(h + out, ("batch", "seq", "embed")), aux


def _remat(fn, policy_name: str, *, scanned: bool):
    """fn under `impl.remat`: full recomputes every activation in the backward,
    save_dots keeps the matmul outputs, save_attention_out the attention core's; experts keeps
    everything but the routed experts' rows (dispatch gathers, grouped GEMMs, combine), which
    `RoutedExperts` recomputes under its own checkpoint.  All keep the fp8 policies' quantized weights (`FP8_WEIGHT`: 1 byte per parameter; none in bf16/fp32),
    which are not activations: recomputing them would quantize every weight twice a step.
    Outside a scan (`scanned=False`) the recomputation is kept apart from the forward
    (`prevent_cse`), else XLA may merge the two and keep the activations after all."""
    if policy_name in ("none", "experts"):
        return fn
    names = jax.checkpoint_policies.save_only_these_names
    policies = {
        "full": names(FP8_WEIGHT),
        "save_dots": jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable, names(FP8_WEIGHT)
        ),
        "save_attention_out": names("attention_out", FP8_WEIGHT),
    }
    return jax.checkpoint(fn, policy=policies[policy_name], prevent_cse=not scanned)


def apply_layers(body, carry, layers, *, scan: bool):
    """carry_l, y_l = body(carry_{l-1}, layers[l]) for l = 0 .. L-1, over the pytree `layers`
    whose leaves carry a leading [L] axis -> (carry_L, the y_l stacked [L, ...]).

    scan=True: one `lax.scan` (the body is compiled once; what it keeps for the backward is
    written into stacked [L, ...] buffers); False: a Python loop over `lax.unstack` slices (L
    copies of the body; kept residuals are plain per-layer buffers and the gradient of `layers`
    is stacked once, the transpose of unstack)."""
    if scan:
        return jax.lax.scan(body, carry, layers)
    leaves, treedef = jax.tree.flatten(layers)
    ys = []
    for layer in zip(*(jax.lax.unstack(leaf) for leaf in leaves)):
        carry, y = body(carry, treedef.unflatten(layer))
        ys.append(y)
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def prepend_logical_axis(module: nnx.Module, axis: str) -> None:
    """Adds `axis` in front of the logical axis names of every variable of `module`."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
            var.set_metadata(logical_axes=(axis,) + tuple(var.get_metadata()["logical_axes"]))


class LayerStack(nnx.Module):
    """`num_layers` blocks with stacked parameters, applied in sequence by `apply_layers`
    (`impl.scan_layers`: a scan or a loop); the stacked axis carries the logical name
    `layer_axis`.  The layer count is read from the parameters' leading axis, so a pipeline
    chunk runs this stack's graph on its own L/C layers."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_layers: int,
        *,
        moe: bool,
        layer_axis: str,
        policy: PrecisionPolicy,
        impl: ImplConfig = ImplConfig(),
        experts: ExpertDispatcher = LocalExperts(),
        rngs: nnx.Rngs,
    ):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(layer_rngs: nnx.Rngs) -> Block:
            return Block(cfg, moe=moe, policy=policy, impl=impl, experts=experts, rngs=layer_rngs)

        self.num_layers = num_layers
        self.moe = moe
        self.remat_policy = impl.remat
        self.scan_layers = impl.scan_layers
        self.blocks = create(rngs)
        prepend_logical_axis(self.blocks, layer_axis)

    def __call__(self, x: jax.Array, inputs: SequenceInputs) -> tuple[jax.Array, MoEStats | None]:
        """x [B, T, d] -> (x after all layers, per-layer MoEStats stacked on a leading [L] axis).
        An MoE stack replays inputs.routed_experts [B, T, L, K_r] (layer l: [:, :, l]) when given;
        L must be the layer count of the parameters it holds (a pipeline chunk's: `layer_range`)."""
        graphdef, state = nnx.split(self.blocks)
        replay = inputs.routed_experts if self.moe else None
        if replay is not None:
            layers = jax.tree.leaves(state)[0].shape[0]
            if replay.ndim != 4 or replay.shape[2] != layers:
                raise ValueError(
                    f"routed_experts of shape {tuple(replay.shape)} for an MoE stack of {layers} layers: "
                    f"give [batch, seq, {layers}, num_experts_per_tok] (one selection per MoE layer, in order)"
                )
            replay = jnp.moveaxis(replay, 2, 0)  # [L, B, T, K_r]
        block_inputs = inputs._replace(routed_experts=None)

        def body(h, xs):
            layer_state, routed_experts = xs
            return nnx.merge(graphdef, layer_state)(h, block_inputs, routed_experts)

        layer = _remat(body, self.remat_policy, scanned=self.scan_layers)
        return apply_layers(layer, x, (state, replay), scan=self.scan_layers)

    def extend(
        self, x: jax.Array, inputs: SequenceInputs, cache: LatentCache, ctx: ExtendContext
    ) -> tuple[jax.Array, LatentCache, jax.Array | None]:
        """`Block.extend` through the L layers; cache [L, ...] is carried whole from layer to
        layer (each writes its new tokens in place) -> (x after all layers, cache, the routed
        experts [L, B, T, K] of an MoE stack or None)."""
        graphdef, state = nnx.split(self.blocks)

        def body(carry, xs):
            h, cache = carry
            layer_state, layer = xs
            h, cache, experts = nnx.merge(graphdef, layer_state).extend(h, inputs, cache, layer, ctx)
            return (h, cache), experts

        layers = (state, jnp.arange(self.num_layers))
        (x, cache), experts = apply_layers(body, (x, cache), layers, scan=self.scan_layers)
        return x, cache, experts
