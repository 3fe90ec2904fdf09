"""lm-eval-harness adapter: the model `frontier_jax` in lm-eval's registry.

    lm_eval --include_path ... --model frontier_jax \\
        --model_args checkpoint=RUN_DIR[,step=N][,dtype=bfloat16][,mesh_tensor=2][,max_length=2048] \\
        --tasks ...          (or hf=PATH instead of checkpoint=RUN_DIR)

(the `lm_eval` console script does not import this module; use `python -m frontier_jax.eval.lm_eval`
with the same arguments, or `import frontier_jax.eval.lm_eval` before `lm_eval.simple_evaluate`.)

Built on lm-eval's `TemplateLM`, so contexts and continuations are split into tokens exactly as
its `hf` backend does (`_encode_pair`; an empty context becomes the prefix token, bos).  Every
request is one `windows.Window` scored by the shared `Scorer` (batched, sharded over the mesh):
    loglikelihood(ctx, cont)   = sum_i log p(cont_i | ctx, cont_<i), and whether cont is greedy;
                                 the window is the last max_length + 1 tokens of ctx + cont
    loglikelihood_rolling(doc) = lm-eval's own disjoint rolling windows (prefix token, context 1)
    generate_until(ctx, {until, max_gen_toks, ...}) = greedy (or sampled) `infer.Engine` decode
                                 with the stop strings, context left-truncated to
                                 max_length - max_gen_toks tokens
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it fills an empty registry only)
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from frontier_jax.eval.config import EvalConfig
from frontier_jax.eval.model import EvalModel, load_checkpoint, load_hf
from frontier_jax.eval.run import build_scorer
from frontier_jax.eval.scorer import batch_split
from frontier_jax.eval.windows import Window
from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.parallel.config import MeshConfig


@register_model("frontier_jax")
class FrontierJaxLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str | None = None,
        hf: str | None = None,
        step: int | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        devices: int | None = None,
        mesh_data: int = -1,
        mesh_fsdp: int = 1,
        mesh_expert: int = 1,
        mesh_tensor: int = 1,
        tokenizer: str | None = None,
        **_ignored,
    ):
        super().__init__()
        if (checkpoint is None) == (hf is None):
            raise ValueError("frontier_jax model_args: give exactly one of checkpoint=RUN_DIR and hf=PATH")
        mesh = MeshConfig(
            data=int(mesh_data), fsdp=int(mesh_fsdp), expert=int(mesh_expert), tensor=int(mesh_tensor)
        )
        devices = None if devices is None else int(devices)
        self.model: EvalModel = (
            load_checkpoint(
                checkpoint, None if step is None else int(step), mesh=mesh, dtype=dtype, devices=devices
            )
            if checkpoint is not None
            else load_hf(hf, mesh=mesh, dtype=dtype, tokenizer=tokenizer, devices=devices)
        )
        self.tokenizer = self.model.tokenizer
        self._max_length = int(max_length) if max_length else self.model.train_seq_len
        self.max_gen_toks = int(max_gen_toks)
        batch = 8 if str(batch_size) == "auto" else int(str(batch_size).split(":")[0])
        ways = batch_split(self.model.program)
        batch = -(-batch // ways) * ways  # rounded up to the mesh's batch split
        self.scorer, _ = build_scorer(
            self.model, EvalConfig(seq_len=self._max_length, batch_size=batch), progress=False
        )
        self._engine: Engine | None = None

    # ---------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.special_id("eos")

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.special_id("bos")

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    # ---------------------------------------------------------------- log-likelihoods
    def _score(
        self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool
    ) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation), continuation is greedy)."""
        windows = []
        for context, continuation in pairs:
            ids = (list(context) + list(continuation))[-(self._max_length + 1) :]
            scored = np.zeros(len(ids) - 1, np.int32)
            scored[-len(continuation) :] = 1
            windows.append(Window(np.asarray(ids[:-1], np.int32), np.asarray(ids[1:], np.int32), scored, 0))
        out = []
        scores = self.scorer.score(windows, desc="loglikelihood")
        for window, (logprob, greedy) in zip(windows, scores):
            mask = window.scored.astype(bool)
            out.append((float(np.sum(logprob[mask], dtype=np.float64)), bool(greedy[mask].all())))
        return out

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        results = self._score(
            [(context, continuation) for _, context, continuation in requests], disable_tqdm
        )
        for (cache_key, _, _), result in zip(requests, results):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for window in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                pairs.append(window)
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._score(pairs, disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._engine is None:
            self._engine = Engine.from_program(
                self.model.program, self.model.params, self.model.biases, tokenizer=self.tokenizer
            )
        prompts, params = [], []
        eos = self.tokenizer.decode([self.eot_token_id])
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.get("do_sample", True) else 0.0
            ids = self.tok_encode(context)[-max(self._max_length - max_new, 1) :]
            prompts.append(ids)
            params.append(
                SamplingParams(
                    max_new_tokens=max_new,
                    temperature=temperature,
                    stop=tuple(s for s in until if s and s != eos),
                )
            )
        completions = self._engine.generate(prompts, params, progress=not disable_tqdm)
        out, specials = [], set(self.tokenizer.special_ids.values())
        for req, completion, p in zip(requests, completions, params):
            if completion.finish_reason == "error":
                raise ValueError(f"generate_until: {completion.error}")
            # as lm-eval's hf backend: special tokens skipped in decoding, cut at the first stop string
            text = self.tokenizer.decode([t for t in completion.output_ids if t not in specials])
            for stop in p.stop:
                text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def main() -> None:
    """`python -m frontier_jax.eval.lm_eval ARGS`: lm-eval's CLI with this model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
