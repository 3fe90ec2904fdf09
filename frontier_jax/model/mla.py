"""Multi-head Latent Attention (DeepSeek-V2/V3, Sec. 2.1.1 of the V3 report).

For hidden states h_t [d] (n_h heads, head dims d_h (nope), d_h^R (rope), d_v):
  queries   c_t^Q = RMSNorm(W^DQ h_t)                  [d_c']   (or h_t itself when q_lora_rank=0)
            [q_t^C ; q_t^R'] = W^UQ c_t^Q               [n_h, d_h + d_h^R]
            q_t^R = RoPE(q_t^R')
  keys/vals c_t^KV = RMSNorm(W^DKV h_t)                [d_c]    <- the latent cache
            k_t^R  = RoPE(W^KR h_t)                     [d_h^R]  <- shared by all heads, cached
            k_t^C  = W^UK c_t^KV,  v_t = W^UV c_t^KV   [n_h, d_h], [n_h, d_v]
  attention o_t,i = sum_j softmax_j(s [q_t,i^C; q_t,i^R] . [k_j,i^C; k_j^R]) v_j,i
            u_t = W^O [o_t,1; ...; o_t,n_h]            [d]
with s = softmax_scale(cfg) (1/sqrt(d_h + d_h^R), YaRN-corrected).  Only c^KV and k^R
(d_c + d_h^R numbers per token and layer) need caching at inference.

Inference (`extend`) runs over a paged latent cache (`latent_cache.py`) in one of two ways:
  expanded (prefill, compute-bound): k^C, v of every cached token from c^KV, then the
            attention above (`attend`); with `impl.attention=cudnn` the chunk attends to its
            cached prefix and to itself in two flash calls merged by their log-sum-exp
            (`attend_chunk`, `attention.chunk_attention`), so the kernel skips masked blocks;
  absorbed  (decode, memory-bound): W^UK folds into the query and W^UV applies after the
            softmax-weighted sum of latents, so per-head keys/values are never formed:
            q~_t,i = W^UK_i^T q_t,i^C                                  [n_h, d_c]
            s_t,i,j = s (q~_t,i . c_j^KV + q_t,i^R . k_j^R)
            o_t,i = W^UV_i sum_j softmax_j(s_t,i,j) c_j^KV              [n_h, d_v]
  since q^C . (W^UK c) = (W^UK^T q^C) . c and sum_j p_j W^UV c_j = W^UV sum_j p_j c_j.
  Per decoded token this reads (d_c + d_h^R) numbers per cached token and layer instead of
  n_h (d_h + d_h^R + d_v).  The folds are applied to activations each step, not precomputed:
  the products W^UQ_i W^UK_i^T [d_c', n_h, d_c] and W^UV_i W^O_i [d_c, n_h, d] would hold
  d_c' n_h d_c and d_c n_h d parameters per layer (V3: 101M and 470M, 3x and 3.7x the factors
  they replace), more weight bytes read per decode step for a saving in small activation GEMMs.

The two latent RMSNorms (of W^DQ h and W^DKV h) use eps = LATENT_NORM_EPS = 1e-6 whatever
`rms_norm_eps` is: DeepSeek's reference code and transformers build `q_a_layernorm` and
`kv_a_layernorm` with the norm's default eps, so checkpoints with another `rms_norm_eps`
(Moonlight: 1e-5) were trained with 1e-6 there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from frontier_jax.model.attention import cached_latent_attention, chunk_attention, dot_product_attention
from frontier_jax.model.config import AttentionImpl, ModelConfig
from frontier_jax.model.extend_context import ExtendContext
from frontier_jax.model.latent_cache import LatentCache, read_latent, write_latent
from frontier_jax.model.layers import Linear, RMSNorm, project_jointly
from frontier_jax.model.rope import RotaryEmbedding, softmax_scale
from frontier_jax.parallel.rules import constrain
from frontier_jax.precision import PrecisionPolicy

LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        policy: PrecisionPolicy,
        attention: AttentionImpl = AttentionImpl.xla,
        rngs: nnx.Rngs,
    ):
        """attention: the attention core of the expanded path (`impl.attention`)."""
        d, h, std = cfg.hidden_size, cfg.num_heads, cfg.init_std
        self.cfg, self.attention_impl = cfg, attention
        self.rope = RotaryEmbedding.from_config(cfg)
        self.scale = softmax_scale(cfg)
        lin = dict(std=std, policy=policy, rngs=rngs)
        if cfg.q_lora_rank:
            self.wq_a = Linear((d,), (cfg.q_lora_rank,), ("embed", "q_lora"), name="mla.wq_a", **lin)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.wq_b = Linear(
                (cfg.q_lora_rank,),
                (h, cfg.qk_head_dim),
                ("q_lora", "heads", "qk_head"),
                name="mla.wq_b",
                **lin,
            )
        else:
            self.wq = Linear((d,), (h, cfg.qk_head_dim), ("embed", "heads", "qk_head"), name="mla.wq", **lin)
        self.wkv_a = Linear((d,), (cfg.kv_lora_rank,), ("embed", "kv_lora"), name="mla.wkv_a", **lin)
        self.wk_rope = Linear((d,), (cfg.qk_rope_head_dim,), ("embed", "rope"), name="mla.wk_rope", **lin)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.wk_b = Linear(
            (cfg.kv_lora_rank,),
            (h, cfg.qk_nope_head_dim),
            ("kv_lora", "heads", "qk_head"),
            name="mla.wk_b",
            **lin,
        )
        self.wv_b = Linear(
            (cfg.kv_lora_rank,), (h, cfg.v_head_dim), ("kv_lora", "heads", "v_head"), name="mla.wv_b", **lin
        )
        self.wo = Linear((h, cfg.v_head_dim), (d,), ("heads", "v_head", "embed"), name="mla.wo", **lin)

    def query(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, d] -> (q^C [B, T, H, d_h], q^R [B, T, H, d_h^R]) with RoPE applied."""
        return self._query(self._q_down(x), positions)

    def latent(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, d] -> the cacheable latent (c^KV [B, T, d_c], k^R [B, T, d_h^R])."""
        return self._latent(self.wkv_a(x), self.wk_rope(x), positions)

    @property
    def _q_down(self) -> Linear:
        """The query projection that reads h_t: W^DQ, or W^Q without q-LoRA."""
        return self.wq_a if self.cfg.q_lora_rank else self.wq

    def _query(self, q: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """W^DQ h (or W^Q h) -> (q^C, q^R) as in `query`."""
        if self.cfg.q_lora_rank:
            q = self.wq_b(self.q_norm(q))
        q = constrain(q, ("batch", "seq", "heads", "qk_head"))
        q_nope, q_rope = jnp.split(q, [self.cfg.qk_nope_head_dim], axis=-1)
        return q_nope, self.rope(q_rope, positions)

    def _latent(self, kv: jax.Array, k_rope: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(W^DKV h, W^KR h) -> (c^KV, k^R) as in `latent`."""
        return self.kv_norm(kv), self.rope(k_rope[:, :, None, :], positions)[:, :, 0, :]

    def attend(
        self, q_nope, q_rope, c_kv, k_rope, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0
    ) -> jax.Array:
        """Expands the latent into per-head keys/values (`_keys_values`) and attends; returns
        u [B, T, d]."""
        o = dot_product_attention(
            jnp.concatenate([q_nope, q_rope], axis=-1),
            *self._keys_values(c_kv, k_rope),
            scale=self.scale,
            impl=self.attention_impl,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_offset=q_offset,
        )
        return self._output(o)

    def attend_chunk(
        self, q_nope, q_rope, new: tuple, prefix: tuple, prefix_lengths, new_lengths
    ) -> jax.Array:
        """A prefill chunk on a flash kernel: `attention.chunk_attention` of the queries over
        the chunk's own latent new = (c^KV [B, T, d_c], k^R [B, T, d_h^R]) and the cached
        prefix = (c^KV [B, S, d_c], k^R [B, S, d_h^R]) of its rows (positions < prefix_lengths
        [B]); new_lengths [B]: the real tokens of each row.  Returns u [B, T, d]."""
        o = chunk_attention(
            jnp.concatenate([q_nope, q_rope], axis=-1),
            self._keys_values(*new),
            self._keys_values(*prefix),
            new_lengths=new_lengths,
            prefix_lengths=prefix_lengths,
            scale=self.scale,
            implementation=str(self.attention_impl),
        )
        return self._output(o)

    def _keys_values(self, c_kv: jax.Array, k_rope: jax.Array) -> tuple[jax.Array, jax.Array]:
        """c^KV [B, S, d_c], k^R [B, S, d_h^R] -> per-head keys [k^C; k^R] [B, S, H, d_h + d_h^R]
        and values [B, S, H, d_v] (W^UK and W^UV as one projection of c^KV; k^R shared by the heads)."""
        k_nope, v = project_jointly(c_kv, [self.wk_b, self.wv_b])
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])
        return jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1), v

    def _output(self, o: jax.Array) -> jax.Array:
        """Per-head outputs o [B, T, H, d_v] -> W^O o [B, T, d]."""
        return self.wo(checkpoint_name(constrain(o, ("batch", "seq", "heads", "v_head")), "attention_out"))

    def attend_absorbed(
        self, q_nope, q_rope, cache: LatentCache, layer, positions, ctx: ExtendContext
    ) -> jax.Array:
        """The absorbed path (module docstring): q^C [B, T, H, d_h], q^R [B, T, H, d_h^R] against
        the latent c^KV, k^R of layer `layer` of the paged cache (the rows' blocks in
        ctx.pages.block_table [B, M]), queries at positions [B, T] seeing keys j <= position; the
        attention core ctx.attention (`attention.cached_latent_attention`); returns u [B, T, d]."""
        dtype = self.wk_b.policy.compute_dtype
        w_uk, w_uv = self.wk_b.kernel[...].astype(dtype), self.wv_b.kernel[...].astype(dtype)
        q_latent = jnp.einsum(
            "bthk,chk->bthc", q_nope.astype(dtype), w_uk, preferred_element_type=jnp.float32
        )
        o_latent = cached_latent_attention(
            q_latent.astype(dtype),
            q_rope.astype(dtype),
            cache,
            layer,
            ctx.pages.block_table,
            positions,
            scale=self.scale,
            impl=ctx.attention,
        )
        o = jnp.einsum("bthc,chv->bthv", o_latent, w_uv, preferred_element_type=jnp.float32).astype(dtype)
        return self.wo(constrain(o, ("batch", "seq", "heads", "v_head")))

    def extend(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LatentCache,
        layer,
        ctx: ExtendContext,
    ) -> tuple[jax.Array, LatentCache]:
        """Self-attention of T new tokens per row over their sequence's cached tokens and
        themselves: x [B, T, d] at positions [B, T] (consecutive per row) -> (u [B, T, d], the
        cache with the new tokens' c^KV, k^R written into layer `layer` at ctx.pages).
        ctx.absorbed False: the expanded path (prefill chunks), True: the absorbed path (decode,
        ctx.attention its kernel)."""
        q, kv, k_rope = project_jointly(x, [self._q_down, self.wkv_a, self.wk_rope])
        q_nope, q_rope = self._query(q, positions)
        c_new, k_rope_new = self._latent(kv, k_rope, positions)
        cache = write_latent(cache, layer, c_new, k_rope_new, positions, ctx.pages)
        if ctx.absorbed:
            return self.attend_absorbed(q_nope, q_rope, cache, layer, positions, ctx), cache
        c_kv, k_rope = read_latent(cache, layer, ctx.pages.block_table)
        dtype = self.wk_b.policy.compute_dtype
        if self.attention_impl == AttentionImpl.cudnn:  # a flash kernel with seq lengths and residuals
            new_lengths = ctx.pages.write.sum(axis=1).astype(jnp.int32)
            return self.attend_chunk(
                q_nope,
                q_rope,
                (c_new.astype(dtype), k_rope_new),
                (c_kv.astype(dtype), k_rope),
                positions[:, 0],
                new_lengths,
            ), cache
        return self.attend(q_nope, q_rope, c_kv.astype(dtype), k_rope, q_offset=positions[:, 0]), cache

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Self-attention over a full sequence: x [B, T, d] -> [B, T, d].  The three
        projections of x (W^DQ, W^DKV, W^KR) run as one (`project_jointly`)."""
        q, kv, k_rope = project_jointly(x, [self._q_down, self.wkv_a, self.wk_rope])
        q_nope, q_rope = self._query(q, positions)
        c_kv, k_rope = self._latent(kv, k_rope, positions)
        return self.attend(
            q_nope, q_rope, c_kv, k_rope, q_segment_ids=segment_ids, kv_segment_ids=segment_ids
        )
