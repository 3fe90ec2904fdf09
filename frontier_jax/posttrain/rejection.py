"""Rejection sampling into SFT data: keep rules, per-prompt statistics and a resumable writer.

For prompt i with samples y_i1 .. y_in (rewards r_ij, None = not scored):

    correct_i = #{j : r_ij >= threshold}          pass@n_i = [correct_i > 0]
    kept_i    = the first k of the samples that pass every rule, best reward first:
                r_ij >= threshold (None never passes), the format when required, a length in
                tokens within [min_tokens, max_tokens], a finished generation (not cut at the
                length limit), and a text not kept before for this prompt (normalised)
    weight    = 1 / |kept_i| with `weight: per_prompt` (each prompt weighs 1 in total), none else

Records are `{"prompt", "response"}` (`"weight"` when weighted), the `prompt_response` JSONL
that SFT reads.  Preference pairs (`PairRules`, optional) come from the same samples, for
training a reward model:

    rejected_i = the distinct (normalised) finished samples with r_ij < threshold, in sampling order
    chosen_i   = the samples `select` keeps, in turn; where none passes, the gold response
                 (a template over the row's columns, e.g. "<answer>{answer}</answer>"), if given
    pairs_i    = up to `per_prompt` {"prompt", "chosen", "rejected"}: (chosen_i[m mod |chosen_i|],
                 rejected_i[m]), m = 0, 1, ..; none without a rejected or a chosen side

`Writer` appends each prompt's records (and pairs) in one write per file, fsynced, then one line
of statistics to `OUT.stats.jsonl` carrying the byte sizes of OUT (and the pairs file) after
them; a resumed run truncates them to the last recorded sizes (dropping the lines of a prompt
whose statistics never landed) and continues with the next prompt, so no line is ever partial
or duplicated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from frontier_jax.posttrain.answers import FORMAT, normalise


@dataclasses.dataclass(frozen=True)
class KeepRules:
    threshold: float = 1.0  # keep samples whose combined reward is >= this
    require_format: bool = False  # the `format` reward's pattern must match
    min_tokens: int = 1
    max_tokens: int | None = None
    max_per_prompt: int = 1  # k
    weight: str = "none"  # none | per_prompt
    keep_truncated: bool = False  # also keep generations cut at max_new_tokens

    def check(self) -> KeepRules:
        if self.max_per_prompt < 1:
            raise ValueError(f"--max-per-prompt={self.max_per_prompt} must be >= 1")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"--max-tokens={self.max_tokens} is below --min-tokens={self.min_tokens}")
        if self.weight not in ("none", "per_prompt"):
            raise ValueError(f"--weight={self.weight!r} must be none or per_prompt")
        return self


@dataclasses.dataclass(frozen=True)
class Sample:
    text: str
    reward: float | None
    tokens: int
    finished: bool  # ended by a stop token / string, not by the length limit


def passes(sample: Sample, rules: KeepRules) -> bool:
    return sample.reward is not None and sample.reward >= rules.threshold


def select(samples: Sequence[Sample], rules: KeepRules) -> list[Sample]:
    """The kept samples of one prompt (module docstring), best reward first."""
    candidates = [
        s
        for s in samples
        if passes(s, rules)
        and (s.finished or rules.keep_truncated)
        and (not rules.require_format or FORMAT.fullmatch(s.text) is not None)
        and rules.min_tokens <= s.tokens <= (rules.max_tokens or s.tokens)
    ]
    kept, seen = [], set()
    for s in sorted(candidates, key=lambda s: -s.reward):  # stable: sampling order among ties
        key = normalise(s.text)
        if key not in seen:
            seen.add(key)
            kept.append(s)
        if len(kept) == rules.max_per_prompt:
            break
    return kept


@dataclasses.dataclass(frozen=True)
class PairRules:
    per_prompt: int = 1  # pairs per prompt, at most
    gold_response: str | None = None  # chosen side where no sample passes: str.format over the row

    def check(self) -> PairRules:
        if self.per_prompt < 1:
            raise ValueError(f"--pairs-per-prompt={self.per_prompt} must be >= 1")
        return self

    def gold(self, row: Mapping) -> str | None:
        """The gold response of a prompt row, or None without a template; an error naming a
        column the row lacks."""
        if self.gold_response is None:
            return None
        try:
            return self.gold_response.format(**row)
        except KeyError as e:
            raise ValueError(
                f"--gold-response {self.gold_response!r}: the prompt row has no column {e.args[0]!r}"
            ) from None


def preference_pairs(
    prompt: str, samples: Sequence[Sample], rules: KeepRules, pairs: PairRules, gold: str | None = None
) -> list[dict]:
    """The {"prompt", "chosen", "rejected"} pairs of one prompt (module docstring)."""
    rejected, seen = [], set()
    for s in samples:
        key = normalise(s.text)
        if s.reward is not None and s.reward < rules.threshold and s.finished and key not in seen:
            seen.add(key)
            rejected.append(s.text)
    chosen = [s.text for s in select(samples, dataclasses.replace(rules, max_per_prompt=pairs.per_prompt))]
    if not chosen and gold is not None:
        chosen = [gold]
    if not chosen:
        return []
    return [
        {"prompt": prompt, "chosen": chosen[m % len(chosen)], "rejected": text}
        for m, text in enumerate(rejected[: pairs.per_prompt])
    ]


def records(prompt: str, kept: Sequence[Sample], rules: KeepRules) -> list[dict]:
    weight = {"weight": 1.0 / len(kept)} if rules.weight == "per_prompt" and kept else {}
    return [{"prompt": prompt, "response": s.text, **weight} for s in kept]


def prompt_stats(
    index: int, samples: Sequence[Sample], kept: Sequence[Sample], rules: KeepRules, pairs: int = 0
) -> dict:
    correct = sum(passes(s, rules) for s in samples)
    return {
        "index": index,
        "n": len(samples),
        "correct": correct,
        "pass_at_n": float(correct > 0),
        "unscored": sum(s.reward is None for s in samples),
        "kept": len(kept),
        "kept_tokens": [s.tokens for s in kept],
        "pairs": pairs,
    }


def summary(stats: Sequence[Mapping]) -> dict:
    """Totals over prompts: pass@n, the mean pass rate, kept records and their lengths."""
    prompts = len(stats)
    kept_tokens = [t for s in stats for t in s["kept_tokens"]]
    return {
        "prompts": prompts,
        "samples": sum(s["n"] for s in stats),
        "pass_at_n": sum(s["pass_at_n"] for s in stats) / max(prompts, 1),
        "pass_rate": sum(s["correct"] for s in stats) / max(sum(s["n"] for s in stats), 1),
        "unscored": sum(s["unscored"] for s in stats),
        "kept": len(kept_tokens),
        "prompts_with_kept": sum(s["kept"] > 0 for s in stats),
        "kept_tokens_mean": sum(kept_tokens) / len(kept_tokens) if kept_tokens else 0.0,
        "kept_tokens_min": min(kept_tokens, default=0),
        "kept_tokens_max": max(kept_tokens, default=0),
        "pairs": sum(s.get("pairs", 0) for s in stats),
    }


def _jsonl(rows: Sequence[Mapping]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _fsync_append(path: Path, text: str) -> int:
    """Appends `text` in one write, fsynced; the file's size after it."""
    with open(path, "ab") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


class Writer:
    """Appends each prompt's records to `out` (its preference pairs to `pairs_out`, if given) and
    its statistics to `out.stats.jsonl`, resuming where a previous run with the same `settings`
    stopped (module docstring)."""

    def __init__(self, out: str | Path, settings: Mapping, pairs_out: str | Path | None = None):
        self.out = Path(out)
        self.pairs_out = None if pairs_out is None else Path(pairs_out)
        self.stats_path = self.out.with_name(self.out.name + ".stats.jsonl")
        self.settings = json.loads(json.dumps(dict(settings)))  # as read back (tuples as lists)
        self.stats: list[dict] = []
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.stats_path.exists():
            self._resume()
        else:
            self.out.write_bytes(b"")
            if self.pairs_out is not None:
                self.pairs_out.parent.mkdir(parents=True, exist_ok=True)
                self.pairs_out.write_bytes(b"")
            _fsync_append(self.stats_path, json.dumps({"settings": self.settings}) + "\n")

    def _resume(self) -> None:
        lines = self.stats_path.read_text(encoding="utf-8").split("\n")
        complete = lines[:-1]  # the text after the last newline is a line cut short
        saved = (json.loads(complete[0]) if complete else {}).get("settings", {})
        differ = sorted(key for key in {*saved, *self.settings} if saved.get(key) != self.settings.get(key))
        if differ:
            raise ValueError(
                f"{self.out} was written with other settings ({', '.join(differ)} differ, {self.stats_path}); "
                "run the same command to resume, or choose another --out"
            )
        self.stats = [json.loads(line) for line in complete[1:]]
        files = [(self.out, "out_bytes")] + ([(self.pairs_out, "pairs_bytes")] if self.pairs_out else [])
        for path, key in files:
            size = self.stats[-1][key] if self.stats else 0
            if not path.exists() or path.stat().st_size < size:
                raise ValueError(
                    f"{path} is shorter than {self.stats_path} records ({size} bytes); choose another --out"
                )
            with open(path, "r+b") as f:
                f.truncate(size)
        with open(self.stats_path, "r+b") as f:
            f.truncate(sum(len(line.encode("utf-8")) + 1 for line in complete))

    @property
    def done(self) -> int:
        """Prompts finished (0 .. done - 1)."""
        return len(self.stats)

    def write(
        self, prompt: str, samples: Sequence[Sample], rules: KeepRules, pairs: Sequence[Mapping] = ()
    ) -> dict:
        """Writes one prompt's kept records and its `pairs` (`preference_pairs`; only with a
        `pairs_out`), then its statistics line."""
        if pairs and self.pairs_out is None:
            raise ValueError("preference pairs need a Writer with pairs_out")
        kept = select(samples, rules)
        line = {"out_bytes": _fsync_append(self.out, _jsonl(records(prompt, kept, rules)))}
        if self.pairs_out is not None:
            line["pairs_bytes"] = _fsync_append(self.pairs_out, _jsonl(pairs))
        line = {**prompt_stats(self.done, samples, kept, rules, len(pairs)), **line}
        _fsync_append(self.stats_path, json.dumps(line) + "\n")
        self.stats.append(line)
        return line
