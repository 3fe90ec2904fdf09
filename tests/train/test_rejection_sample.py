"""`frontier-jax rejection-sample` on the reference LM run: {prompt, response} records in prompt
order with per-prompt statistics and a summary, preference pairs beside them (`--pairs-out`); a run interrupted after its first prompt (Ctrl-C
inside the writer) resumes into exactly the file the uninterrupted run wrote."""

import json

from frontier_jax.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
from frontier_jax.posttrain import rejection

PROMPTS = [
    {"prompt": "1+1=", "answer": "2"},
    {"prompt": "def f(x):", "answer": "x"},
    {"prompt": "3*3=", "answer": "9"},
]


def _command(run, prompts, out, *extra):
    return [
        "rejection-sample", "--checkpoint", str(run), "--prompts", str(prompts), "--out", str(out),
        "--rewards", "format,exact", "--threshold", "0", "--keep-truncated", "--n", "3", "--max-new-tokens", "6",
        "--max-per-prompt", "2", "--batch-prompts", "1", "--seed", "5", "--pairs-out", f"{out}.pairs",
        "--gold-response", "<answer>{answer}</answer>", *extra,
    ]  # fmt: skip


def test_rejection_sample_writes_records_and_statistics_and_resumes(
    reference_run, tmp_path, monkeypatch, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    whole = tmp_path / "whole.jsonl"
    assert main(_command(reference_run, prompts, whole)) == 0
    records = [json.loads(line) for line in whole.read_text().splitlines()]
    assert records and all(
        set(r) == {"prompt", "response"} and isinstance(r["response"], str) for r in records
    )
    order = [p["prompt"] for p in PROMPTS]
    assert [order.index(r["prompt"]) for r in records] == sorted(order.index(r["prompt"]) for r in records)
    stats = [json.loads(line) for line in (tmp_path / "whole.jsonl.stats.jsonl").read_text().splitlines()[1:]]
    assert [(s["index"], s["n"]) for s in stats] == [(0, 3), (1, 3), (2, 3)]
    assert sum(s["kept"] for s in stats) == len(records) and all(s["kept"] <= 2 for s in stats)
    summary = json.loads((tmp_path / "whole.jsonl.summary.json").read_text())
    assert summary["prompts"] == 3 and summary["kept"] == len(records)
    pairs = [json.loads(line) for line in (tmp_path / "whole.jsonl.pairs").read_text().splitlines()]
    assert summary["pairs"] == len(pairs) == sum(s["pairs"] for s in stats)
    assert all(set(p) == {"prompt", "chosen", "rejected"} and p["chosen"] != p["rejected"] for p in pairs)
    assert "pass@3" in capsys.readouterr().out

    real_write, calls = rejection.Writer.write, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    cut = tmp_path / "cut.jsonl"
    monkeypatch.setattr(rejection.Writer, "write", interrupted)
    assert main(_command(reference_run, prompts, cut)) == EXIT_INTERRUPTED
    monkeypatch.setattr(rejection.Writer, "write", real_write)
    assert main(_command(reference_run, prompts, cut)) == 0
    assert "resuming after 1 of 3 prompts" in capsys.readouterr().out
    assert cut.read_text() == whole.read_text()
    assert (tmp_path / "cut.jsonl.pairs").read_text() == (tmp_path / "whole.jsonl.pairs").read_text()

    assert main(_command(reference_run, prompts, cut, "--max-new-tokens", "7")) == EXIT_USAGE
    assert "other settings" in capsys.readouterr().err
