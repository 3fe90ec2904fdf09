"""Group-relative advantages of GRPO, and the sample filters around them.

Samples come in groups of G (the completions of one prompt, consecutive).  A reward of None (no
function scored the sample) is NaN here: such a sample is left out of its group's statistics, gets
advantage 0 and does not train.  For sample j of group g with reward r_gj, over the scored
samples S_g of the group (population mean and standard deviation):

    group   A_gj = (r_gj - mean_{S_g} r) / (std_{S_g} r + eps)
    batch   A_gj = (r_gj - mean_{S_g} r) / (std over every scored sample of the batch + eps)
    none    A_gj =  r_gj - mean_{S_g} r                       (Dr. GRPO: no std scaling)

A group whose scored rewards are all equal (or that has fewer than two scored samples) has zero
spread: its advantages are 0 and DAPO's dynamic sampling drops it (`spread_groups`).

The soft over-length penalty (DAPO), counted in tokens: with L_max the longest completion and a
buffer of b tokens, a completion of L tokens adds

    0                                 L <= L_max - b
    -penalty (L - (L_max - b)) / b    L_max - b < L <= L_max

to its reward before the advantages.  Truncated completions (cut at L_max, no end token) can be
masked out of the loss (`mask_truncated`); their rewards still enter the group statistics.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np


class ScaleRewards(enum.StrEnum):
    group = "group"
    batch = "batch"
    none = "none"


def as_array(rewards: Sequence[float | None]) -> np.ndarray:
    """[N] float64 with NaN for None."""
    return np.array([np.nan if r is None else float(r) for r in rewards], np.float64)


def _groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    if rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def spread_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[N / G] bool: groups with at least two scored samples whose rewards differ."""
    groups = _groups(rewards, group_size)
    scored = ~np.isnan(groups)
    high = np.where(scored, groups, -np.inf).max(1)
    low = np.where(scored, groups, np.inf).min(1)
    return (scored.sum(1) >= 2) & (high > low)


def group_advantages(
    rewards: np.ndarray, group_size: int, scale: ScaleRewards, eps: float = 1e-4
) -> np.ndarray:
    """[N] float32 advantages (module docstring) of rewards [N] (NaN: not scored -> 0)."""
    groups = _groups(rewards, group_size)
    scored = ~np.isnan(groups)
    count = np.maximum(scored.sum(1, keepdims=True), 1)
    filled = np.where(scored, groups, 0.0)
    mean = filled.sum(1, keepdims=True) / count
    centred = np.where(scored, groups - mean, 0.0)
    if scale == ScaleRewards.group:
        std = np.sqrt((centred**2).sum(1, keepdims=True) / count)
        centred = centred / (std + eps)
    elif scale == ScaleRewards.batch:
        values = groups[scored]
        centred = centred / ((values.std() if values.size else 0.0) + eps)
    advantages = np.where(spread_groups(rewards, group_size)[:, None], centred, 0.0)
    return advantages.reshape(-1).astype(np.float32)


def overlong_penalty(lengths: np.ndarray, max_tokens: int, buffer: int, penalty: float) -> np.ndarray:
    """[N] float64 reward terms of the soft over-length penalty (0 everywhere with buffer 0)."""
    if not buffer:
        return np.zeros(len(lengths))
    over = np.asarray(lengths, np.float64) - (max_tokens - buffer)
    return -penalty * np.clip(over, 0, buffer) / buffer


def trains(rewards: np.ndarray, truncated: np.ndarray, mask_truncated: bool) -> np.ndarray:
    """[N] bool: samples whose tokens enter the loss (scored, and finished unless truncated ones train)."""
    keep = ~np.isnan(rewards)
    return keep & ~np.asarray(truncated, bool) if mask_truncated else keep
