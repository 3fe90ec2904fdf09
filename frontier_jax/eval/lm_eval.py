"""lm-eval-harness adapter: the model `frontier_jax` in lm-eval's registry.

    lm_eval --include_path ... --model frontier_jax \\
        --model_args checkpoint=RUN_DIR[,step=N][,dtype=bfloat16][,mesh_tensor=2][,max_length=2048] \\
        --tasks ...          (or hf=PATH instead of checkpoint=RUN_DIR)
    further model_args: max_gen_toks, memory_budget_gb (the generation cache, GiB),
    impl_moe_dispatch (default dropless, whatever the run trained with), devices, tokenizer

(the `lm_eval` console script does not import this module; use `python -m frontier_jax.eval.lm_eval`
with the same arguments, or `import frontier_jax.eval.lm_eval` before `lm_eval.simple_evaluate`.)

Built on lm-eval's `TemplateLM`, so contexts and continuations are split into tokens exactly as
its `hf` backend does (`_encode_pair`; an empty context becomes the prefix token, bos).  Every
request is one `windows.Window` scored by the shared `Scorer` (batched, sharded over the mesh):
    loglikelihood(ctx, cont)   = sum_i log p(cont_i | ctx, cont_<i), and whether cont is greedy;
                                 the window is the last max_length + 1 tokens of ctx + cont; a
                                 continuation with no token of its own, or with more than
                                 max_length tokens, is refused (ValueError), as the hf backend
                                 refuses it (AssertionError)
    loglikelihood_rolling(doc) = lm-eval's own disjoint rolling windows (prefix token, context 1)
    generate_until(ctx, {until, max_gen_toks, ...}) = greedy (or sampled) `infer.Engine` decode
                                 with the stop strings, context left-truncated to
                                 max_length - max_gen_toks tokens (max_gen_toks < max_length)
The engine holds batch_size sequences of max_length tokens (prompt and generation), or as many
cache blocks as memory_budget_gb GiB hold.  The model computes with dropless expert dispatch
unless impl_moe_dispatch is given (`runtime.program.inference_impl`).
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
from frontier_jax.eval.windows import continuation_window
from frontier_jax.infer import Engine, InferConfig, SamplingParams
from frontier_jax.parallel.config import MeshConfig


def _request_name(key: tuple[str, str] | None) -> str:
    """A loglikelihood request by the end of its context and the start of its continuation."""
    if key is None:
        return "loglikelihood request"
    context, continuation = key
    return f"loglikelihood request (context ...{context[-40:]!r}, continuation {continuation[:40]!r})"


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
        memory_budget_gb: float = 0.0,
        impl_moe_dispatch: str | None = None,
        **_ignored,
    ):
        super().__init__()
        if (checkpoint is None) == (hf is None):
            raise ValueError("frontier_jax model_args: give exactly one of checkpoint=RUN_DIR and hf=PATH")
        mesh = MeshConfig(
            data=int(mesh_data), fsdp=int(mesh_fsdp), expert=int(mesh_expert), tensor=int(mesh_tensor)
        )
        devices = None if devices is None else int(devices)
        impl = {} if impl_moe_dispatch is None else {"moe_dispatch": impl_moe_dispatch}
        self.model: EvalModel = (
            load_checkpoint(
                checkpoint,
                None if step is None else int(step),
                mesh=mesh,
                dtype=dtype,
                devices=devices,
                impl=impl,
            )
            if checkpoint is not None
            else load_hf(hf, mesh=mesh, dtype=dtype, tokenizer=tokenizer, devices=devices, impl=impl)
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
        self._infer = InferConfig(
            max_seqs=batch, max_len=self._max_length, memory_budget_gb=float(memory_budget_gb)
        ).validate()
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
        self, pairs: list[tuple[list[int], list[int]]], names: list[str], disable_tqdm: bool
    ) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation), continuation is greedy);
        names[k]: pair k's request, for a refusal."""
        windows = [
            continuation_window(context, continuation, window=self._max_length, name=name)
            for (context, continuation), name in zip(pairs, names)
        ]
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
            [(context, continuation) for _, context, continuation in requests],
            [_request_name(key) for key, _, _ in requests],
            disable_tqdm,
        )
        for (cache_key, _, _), result in zip(requests, results):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner, names = [], [], []
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
                names.append(f"loglikelihood_rolling request {k}")
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._score(pairs, names, disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._engine is None:
            context = self.model.program.cfg.model.max_position_embeddings
            if self._max_length > context:
                raise ValueError(
                    f"generate_until: max_length={self._max_length} exceeds the model's context "
                    f"({context} positions), which bounds the generation cache; lower max_length"
                )
            self._engine = Engine.from_program(
                self.model.program,
                self.model.params,
                self.model.biases,
                tokenizer=self.tokenizer,
                infer=self._infer,
            )
        prompts, params = [], []
        eos = self.tokenizer.decode([self.eot_token_id])
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.get("do_sample", True) else 0.0
            if not 0 < max_new < self._max_length:
                raise ValueError(
                    f"generate_until: max_gen_toks={max_new} must be in [1, max_length={self._max_length}) "
                    "so that the context keeps a token, as lm-eval's hf backend requires"
                )
            ids = self.tok_encode(context)[-(self._max_length - max_new) :]
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
