"""Typed model configuration: every architectural number of a DeepSeek-V3-style model
(`ModelConfig`, the run config's `model:` section), and apart from it the implementation
choices that do not change what the model computes (`ImplConfig`, the `impl:` section), so
that a checkpoint's architecture can be compared without them.

Field names follow the paper (and, where they differ, Hugging Face's DeepseekV3Config names
are given in the comment) so that a published config reads across directly.
Closed choices are Enums (OmegaConf rejects other values when a config is loaded, naming the
field and the allowed values); numeric and cross-field checks run in `validate()` before
anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from frontier_jax.ops.dispatch import MoeDispatch
from frontier_jax.ops.grouped_matmul import GmmGather, GmmImpl


class AttentionImpl(enum.StrEnum):
    """The attention core (`model.attention.dot_product_attention`)."""

    xla = "xla"
    cudnn = "cudnn"
    tokamax = "tokamax"


class RematPolicy(enum.StrEnum):
    """What a rematerialised layer keeps for the backward pass (`model.block`)."""

    none = "none"
    full = "full"
    save_dots = "save_dots"
    save_attention_out = "save_attention_out"
    experts = "experts"  # only the routed experts' dispatch + grouped GEMMs are recomputed


class ScoringFunc(enum.StrEnum):
    sigmoid = "sigmoid"  # V3
    softmax = "softmax"  # V2


class RopeScalingType(enum.StrEnum):
    none = "none"
    yarn = "yarn"


class Head(enum.StrEnum):
    """What the model reads out of its final-normed hidden state."""

    lm = "lm"  # next-token logits over the vocabulary (and MTP depths)
    scalar = "scalar"  # one value per sequence, at its last token (reward / value model, `reward.py`)


def _fail(field_name: str, value, allowed: str) -> None:
    raise ValueError(f"model.{field_name}={value!r} is invalid: {allowed}")


@dataclass(unsafe_hash=True)
class RopeScalingConfig:
    """YaRN context extension (Peng et al. 2023) as used by DeepSeek-V3.

    type: "none" or "yarn"; factor s = target context / original context;
    beta_fast / beta_slow bound the ramp between extrapolated and interpolated frequencies;
    mscale / mscale_all_dim give the attention temperature correction 0.1 * m * ln(s) + 1.
    """

    type: RopeScalingType = RopeScalingType.none
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def context(self) -> int | None:
        """The context the scaling is made for, s L0 (None without scaling)."""
        if self.type != "yarn":
            return None
        return int(self.factor * self.original_max_position_embeddings)

    def validate(self, where: str = "model.rope_scaling") -> "RopeScalingConfig":
        """Raises ValueError naming `where`.<field>, its value and the rule."""
        if self.type != "yarn":
            return self
        if self.factor < 1:
            raise ValueError(f"{where}.factor={self.factor!r} is invalid: YaRN needs factor >= 1")
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"{where}.original_max_position_embeddings={self.original_max_position_embeddings!r} "
                "is invalid: must be > 0"
            )
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"{where}.beta_fast={self.beta_fast!r} is invalid: must exceed {where}.beta_slow "
                f"({self.beta_slow})"
            )
        return self


@dataclass(unsafe_hash=True)
class ModelConfig:
    """Shape of the model.  Sizes are per the DeepSeek-V3 report's notation."""

    name: str = "custom"
    vocab_size: int = 512
    hidden_size: int = 64  # d
    num_layers: int = 2  # main-model transformer blocks (HF num_hidden_layers)
    first_k_dense: int = 1  # leading blocks with a dense FFN (HF first_k_dense_replace)
    dense_ffn_dim: int = 128  # HF intermediate_size
    rms_norm_eps: float = 1e-6
    # --- MLA ---
    num_heads: int = 4  # n_h
    q_lora_rank: int = 32  # d_c' ; 0 means a full-rank query projection (V2-Lite)
    kv_lora_rank: int = 32  # d_c
    qk_nope_head_dim: int = 16  # d_h
    qk_rope_head_dim: int = 8  # d_h^R
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_position_embeddings: int = 4096
    # --- DeepSeekMoE ---
    n_routed_experts: int = 8  # N_r
    n_shared_experts: int = 1  # N_s
    num_experts_per_tok: int = 2  # K_r
    moe_ffn_dim: int = 32  # HF moe_intermediate_size
    n_group: int = 1  # expert groups (devices / nodes) for group-limited routing
    topk_group: int = 1  # groups a token may reach (M)
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: ScoringFunc = ScoringFunc.sigmoid
    # --- MTP ---
    mtp_depth: int = 0  # D (HF num_nextn_predict_layers)
    # --- misc ---
    head: Head = Head.lm
    tie_embeddings: bool = False
    init_std: float = 0.006

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    # --------------------------------------------------------------- validation
    def validate(self) -> "ModelConfig":
        positive = [
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                _fail(name, value, "must be a positive integer")
        non_negative = ["first_k_dense", "q_lora_rank", "n_shared_experts", "mtp_depth"]
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                _fail(name, value, "must be an integer >= 0")
        if self.rms_norm_eps <= 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if self.init_std <= 0:
            _fail("init_std", self.init_std, "must be > 0")
        if self.first_k_dense > self.num_layers:
            _fail("first_k_dense", self.first_k_dense, f"must be <= model.num_layers ({self.num_layers})")
        if self.first_k_dense > 0 and self.dense_ffn_dim <= 0:
            _fail("dense_ffn_dim", self.dense_ffn_dim, "must be > 0 when model.first_k_dense > 0")
        if self.qk_rope_head_dim % 2:
            _fail(
                "qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE rotates pairs of dimensions)"
            )
        if self.rope_theta <= 0:
            _fail("rope_theta", self.rope_theta, "must be > 0")
        self.rope_scaling.validate()
        if self.head == Head.scalar:
            if self.mtp_depth:
                _fail("mtp_depth", self.mtp_depth, "must be 0 with model.head=scalar (MTP predicts tokens)")
            if self.tie_embeddings:
                _fail(
                    "tie_embeddings",
                    self.tie_embeddings,
                    "must be false with model.head=scalar (no output head)",
                )
        if self.num_moe_layers > 0 or self.mtp_depth > 0:
            self._validate_moe()
        return self

    def _validate_moe(self) -> None:
        for name in ["n_routed_experts", "num_experts_per_tok", "moe_ffn_dim", "n_group", "topk_group"]:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                _fail(name, value, "must be a positive integer")
        if self.num_experts_per_tok > self.n_routed_experts:
            _fail(
                "num_experts_per_tok",
                self.num_experts_per_tok,
                f"must be <= model.n_routed_experts ({self.n_routed_experts})",
            )
        if self.n_routed_experts % self.n_group:
            _fail("n_group", self.n_group, f"must divide model.n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"must be <= model.n_group ({self.n_group})")
        experts_reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if experts_reachable < self.num_experts_per_tok:
            _fail(
                "topk_group",
                self.topk_group,
                f"topk_group * experts per group = {experts_reachable} is fewer than "
                f"model.num_experts_per_tok ({self.num_experts_per_tok}); raise topk_group",
            )
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            _fail(
                "n_group",
                self.n_group,
                "group scores sum each group's top-2 experts, so a group needs >= 2 experts",
            )
        if self.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "must be > 0")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


@dataclass(unsafe_hash=True)
class ImplConfig:
    """How the model is computed, not what (the `impl:` section): the attention core, the
    expert grouped-matmul kernel, token dispatch, expert-parallel overlap, the remat policy and
    how the layer stacks run. The modules receive it from their builder (`build_model(cfg, impl=...)`).

    moe_dispatch "capacity" drops the real tokens' assignments past C = ceil(moe_capacity_factor
    N K / E) per expert (counted; N: the tokens dispatched together, each device's shard under
    expert parallelism, `ops.dispatch`); ep_overlap_chunks: chunks of each device's tokens whose all-to-all
    overlaps the other chunks' expert compute under expert parallelism.  gmm_gather "dispatch": the
    dropless dispatch's token rows are gathered inside the Pallas gate/up kernel's loads instead
    of by an XLA gather that writes the sorted [N K, d] copy; "fused": that, and the down kernel
    stores its rows in token order for the combine (and its backward kernels read the gate-scaled
    output gradient of each token in their loads) instead of an XLA collect gather of the
    [N K, d] outputs and its backward gather (where the Pallas bf16 kernel runs the experts
    without expert parallelism; elsewhere the XLA gathers run, same result).

    scan_layers: true applies each stack's L blocks with one `lax.scan` (compiled once, compile
    time flat in L; what a layer keeps for the backward goes into stacked [L, ...] buffers);
    false with a Python loop over layer slices of the same stacked parameters (L copies in the
    program, kept residuals are per-layer buffers). Parameters, checkpoints and results are the
    same either way; the MTP modules always scan.

    expert_replicas R (None: none): each MoE layer runs its N_r experts on N_r + R physical expert
    slots under expert parallelism, slot s holding a copy of logical expert
    `physical_to_logical[s]` (`parallel.placement`; the placement is state of the model, not a
    parameter, so a new placement with the same R changes values, not shapes)."""

    attention: AttentionImpl = AttentionImpl.xla
    gmm: GmmImpl = GmmImpl.auto
    gmm_gather: GmmGather = GmmGather.xla
    moe_dispatch: MoeDispatch = MoeDispatch.dropless
    moe_capacity_factor: float = 1.25
    ep_overlap_chunks: int = 1
    remat: RematPolicy = RematPolicy.none
    scan_layers: bool = True
    expert_replicas: int | None = None

    def validate(self) -> "ImplConfig":
        if self.expert_replicas is not None and (
            not isinstance(self.expert_replicas, int) or self.expert_replicas < 1
        ):
            raise ValueError(
                f"impl.expert_replicas={self.expert_replicas!r} is invalid: a positive integer (redundant "
                "expert slots per MoE layer), or null for none"
            )
        if self.gmm_gather != "xla" and self.gmm not in ("auto", "pallas"):
            raise ValueError(
                f"impl.gmm_gather={self.gmm_gather} is invalid with impl.gmm={self.gmm}: only the Pallas "
                "kernel moves rows in its loads and stores; set impl.gmm=pallas (or auto) or impl.gmm_gather=xla"
            )
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"impl.scan_layers={self.scan_layers!r} is invalid: must be true or false")
        if self.moe_capacity_factor <= 0:
            raise ValueError(f"impl.moe_capacity_factor={self.moe_capacity_factor} is invalid: must be > 0")
        if not isinstance(self.ep_overlap_chunks, int) or self.ep_overlap_chunks <= 0:
            raise ValueError(
                f"impl.ep_overlap_chunks={self.ep_overlap_chunks!r} is invalid: must be a positive integer"
            )
        return self

    def replace(self, **changes) -> "ImplConfig":
        return dataclasses.replace(self, **changes).validate()
