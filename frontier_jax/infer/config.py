"""Typed configuration of the inference engine (the run config's `infer` section)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DecodeAttentionImpl(enum.StrEnum):
    """The absorbed-MLA attention core of decode steps (`model.attention.cached_latent_attention`):
    xla gathers each row's blocks and scores every slot; pallas reads the paged cache in place
    (`kernels.latent_decode`; the Pallas interpreter off the GPU: slow there, for tests)."""

    XLA = "xla"
    PALLAS = "pallas"


class Speculative(enum.StrEnum):
    """Speculative decoding: none, or drafts from the model's MTP modules (`infer.speculative`)."""

    NONE = "none"
    MTP = "mtp"


@dataclass
class InferConfig:
    """Paged latent cache and batching.

    block_size: tokens per cache block (64, as in FlashMLA); max_seqs: sequences decoded at
    once (decode slots); max_len: tokens per sequence, prompt plus generation (0: the smaller
    of 2048 and the model's context);
    prefill_chunk: prompt tokens per prefill step; memory_budget_gb: when > 0 the cache gets
    as many blocks as fit in this many GiB instead of max_seqs x max_len;
    decode_attention_impl: the absorbed attention kernel; speculative: "mtp" drafts
    model.mtp_depth tokens per step with the MTP modules and verifies them in one forward;
    async_decode: dispatch decode step n+1 (fed step n's sampled tokens on the device) before
    reading step n's tokens back, so the host's work overlaps the device's (same tokens as
    False, the synchronous loop; speculative decoding is always synchronous); prefix_cache: full
    cache blocks stay keyed by the tokens up to their end, and a prompt reuses the longest cached
    prefix instead of prefilling it (`scheduler.py`); expert_placement: a placement file of
    redundant experts (`frontier-jax experts plan --out`, `parallel.placement.Placement.load`) the
    MoE layers run on, "" for none; replan_every: when > 0, every that many engine steps the
    placement is planned afresh from the expert loads counted since the last plan (same replica
    count) and applied between steps (`Engine.replan`); decode_steps_per_dispatch: decode steps
    run on the device per dispatch (k; `step.make_decode_steps`: on-device sampling and stop
    checks, the host reading k tokens per row at once, synchronously; 1: one step per dispatch,
    the asynchronous loop above; not with speculative=mtp)."""

    block_size: int = 64
    max_seqs: int = 8
    max_len: int = 0
    prefill_chunk: int = 256
    memory_budget_gb: float = 0.0
    decode_attention_impl: DecodeAttentionImpl = DecodeAttentionImpl.XLA
    speculative: Speculative = Speculative.NONE
    async_decode: bool = True
    prefix_cache: bool = True
    expert_placement: str = ""
    replan_every: int = 0
    decode_steps_per_dispatch: int = 1

    def validate(self) -> "InferConfig":
        for name in ("block_size", "max_seqs", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"infer.{name}={value!r} must be a positive integer")
        if not isinstance(self.max_len, int) or self.max_len < 0:
            raise ValueError(
                f"infer.max_len={self.max_len!r} must be an integer >= 0 (0: min(2048, model context))"
            )
        if self.memory_budget_gb < 0:
            raise ValueError(
                f"infer.memory_budget_gb={self.memory_budget_gb} must be >= 0 (0: size the "
                "cache from infer.max_seqs x infer.max_len)"
            )
        if not isinstance(self.replan_every, int) or self.replan_every < 0:
            raise ValueError(f"infer.replan_every={self.replan_every!r} must be an integer >= 0 (0: never)")
        k = self.decode_steps_per_dispatch
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(
                f"infer.decode_steps_per_dispatch={k!r} must be an integer >= 1 (1: one step per dispatch)"
            )
        if k > 1 and Speculative(self.speculative) == Speculative.MTP:
            raise ValueError(
                f"infer.decode_steps_per_dispatch={k} with infer.speculative=mtp: speculative decoding runs "
                "one verify step per dispatch; set infer.decode_steps_per_dispatch=1 or infer.speculative=none"
            )
        for name in ("async_decode", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"infer.{name}={getattr(self, name)!r} must be true or false")
        DecodeAttentionImpl(self.decode_attention_impl)
        Speculative(self.speculative)
        return self
