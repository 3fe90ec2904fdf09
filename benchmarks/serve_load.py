"""Load test of a running `frontier-jax serve` (loopback only): Poisson arrivals of streamed
completions, latency percentiles, throughput and goodput under SLOs, and a latency plot.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 64 --rate 2 \
        [--max-concurrency 16] [--prompt-len 64 --output-len 32 --len-range 0.5 | --dataset F.jsonl]
        [--slo-ttft-ms 1000] [--slo-tpot-ms 200] [--duration-s 600] [--out results.json --plot lat.png]

Request i arrives at the sum of i exponential gaps of mean 1 / rate (rate inf: all at once),
waits for one of --max-concurrency slots, then streams a completion with ignore_eos, so it
generates exactly its output length.  Lengths are uniform in len x [1 - r, 1 + r] (random token
ids as the prompt), or read from a JSONL file of {"prompt": text or ids, "max_tokens": n}.
Measured per request, from the client: TTFT (sending -> first token), inter-token latencies
(between streamed tokens), TPOT = (e2e - TTFT) / (output tokens - 1), e2e; goodput counts the
requests per second that met every SLO given.  The run is bounded: at most --requests requests
and --duration-s seconds (requests still running then are cancelled and counted as failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
from dataclasses import dataclass, field

import aiohttp
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Result:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = float("nan")
    e2e: float = float("nan")
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else float("nan")


def workload(args, vocab: int, rng: np.random.Generator) -> list[tuple[object, int, int]]:
    """(prompt, prompt length or -1 if text, max_tokens) per request."""
    if args.dataset:
        rows = [json.loads(line) for line in open(args.dataset) if line.strip()]
        picks = rng.integers(0, len(rows), args.requests)
        return [(rows[i]["prompt"], -1, int(rows[i]["max_tokens"])) for i in picks]

    def lengths(mean: int) -> np.ndarray:
        low, high = max(int(mean * (1 - args.len_range)), 1), max(int(mean * (1 + args.len_range)), 1)
        return rng.integers(low, high + 1, args.requests)

    prompts, outputs = lengths(args.prompt_len), lengths(args.output_len)
    return [(rng.integers(0, vocab, int(p)).tolist(), int(p), int(o)) for p, o in zip(prompts, outputs)]


async def one(session, url: str, model: str, prompt, max_tokens: int, headers: dict) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result, start = Result(start=time.perf_counter()), time.perf_counter()
    last = None
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
            if response.status != 200:
                result.error = f"{response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"]:
                    continue
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        result.error = repr(err)
    return result


async def run(args) -> tuple[list[Result], float]:
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.duration_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{url}/v1/models", headers=headers) as response:
            card = (await response.json())["data"][0]
        async with session.get(f"{url}/tokenizer_info", headers=headers) as response:
            vocab = (await response.json())["vocab_size"]
        model = args.model or card["id"]
        rng = np.random.default_rng(args.seed)
        jobs = workload(args, vocab, rng)
        gaps = rng.exponential(1 / args.rate, len(jobs)) if np.isfinite(args.rate) else np.zeros(len(jobs))
        slots = asyncio.Semaphore(args.max_concurrency or len(jobs))

        async def arrive(delay: float, prompt, max_tokens: int) -> Result:
            await asyncio.sleep(delay)
            async with slots:
                return await one(session, url, model, prompt, max_tokens, headers)

        start = time.perf_counter()
        tasks = [asyncio.create_task(arrive(t, p, m)) for t, (p, _, m) in zip(np.cumsum(gaps), jobs)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration_s)
        for task in pending:
            task.cancel()
        results = [t.result() for t in done] + [
            Result(error="not finished within --duration-s") for _ in pending
        ]
        return results, time.perf_counter() - start


def percentiles(values) -> dict:
    values = np.asarray([v for v in values if np.isfinite(v)], np.float64) * 1e3
    if not len(values):
        return {"median": None, "p90": None, "p99": None}
    return {q: float(np.percentile(values, p)) for q, p in (("median", 50), ("p90", 90), ("p99", 99))}


def summary(results: list[Result], duration: float, args) -> dict:
    ok = [r for r in results if r.ok]
    good = [
        r
        for r in ok
        if (args.slo_ttft_ms is None or r.ttft * 1e3 <= args.slo_ttft_ms)
        and (args.slo_tpot_ms is None or not np.isfinite(r.tpot) or r.tpot * 1e3 <= args.slo_tpot_ms)
    ]
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration,
        "total_tokens_per_s": sum(r.output_tokens + r.prompt_tokens for r in ok) / duration,
        "ttft_ms": percentiles(r.ttft for r in ok),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "tpot_ms": percentiles(r.tpot for r in ok),
        "e2e_ms": percentiles(r.e2e for r in ok),
        "goodput": len(good) / duration,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
    }


def plot(results: list[Result], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    first = min(r.start for r in ok)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.scatter([r.start - first for r in ok], [r.ttft * 1e3 for r in ok], s=10, label="TTFT")
    left.scatter([r.start - first for r in ok], [r.e2e * 1e3 for r in ok], s=10, label="e2e")
    left.set(xlabel="arrival (s)", ylabel="ms", title="latency by arrival")
    left.legend()
    for name, values in (("TTFT", [r.ttft for r in ok]), ("TPOT", [r.tpot for r in ok])):
        values = np.sort(np.asarray([v for v in values if np.isfinite(v)]) * 1e3)
        right.plot(values, np.arange(1, len(values) + 1) / len(values), label=name)
    right.set(xlabel="ms", ylabel="share of requests", title="CDF")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="the server, on loopback: http://127.0.0.1:PORT")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--rate", type=float, default=float("inf"), help="mean arrivals per second (inf: all at once)"
    )
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument(
        "--len-range", type=float, default=0.5, help="lengths uniform in len x [1 - r, 1 + r]"
    )
    parser.add_argument("--dataset", default=None, help='JSONL of {"prompt": text or ids, "max_tokens": n}')
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--duration-s", type=float, default=600.0, help="bound on the whole run")
    parser.add_argument("--model", default=None, help="model name (default: the server's)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the summary as JSON here")
    parser.add_argument("--plot", default=None, help="write the latency plot (PNG) here")
    args = parser.parse_args(argv)
    host = urllib.parse.urlparse(args.url).hostname
    if host not in LOOPBACK:
        parser.error(
            f"--url {args.url}: this benchmark only targets loopback ({', '.join(sorted(LOOPBACK))})"
        )
    if (
        args.requests <= 0
        or not args.rate > 0
        or (args.max_concurrency is not None and args.max_concurrency <= 0)
    ):
        parser.error("--requests, --rate and --max-concurrency must be > 0")
    results, duration = asyncio.run(run(args))
    report = summary(results, duration, args)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot and report["completed"]:
        plot(
            results,
            args.plot,
            f"{args.requests} requests at {args.rate}/s, concurrency {args.max_concurrency}",
        )
    return 0 if report["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
