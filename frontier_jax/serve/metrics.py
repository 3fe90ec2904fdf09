"""Prometheus metrics (`/metrics`), vLLM-style names under the `frontier_jax:` prefix.

Counted by the engine thread as tokens are appended: prompt and generation tokens, finished
requests by finish reason, and histograms of time to first token, inter-token latency,
end-to-end latency and queue time (arrival -> admission into a decode slot).  Read from the
engine at each scrape (`snapshot`, run in the engine thread): requests running and waiting, the
share of cache blocks in use, MTP draft acceptance, and per MoE layer the max and the mean over
experts of the tokens routed to each expert since the engine started."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from frontier_jax.infer import Engine

PREFIX = "frontier_jax:"
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)


def snapshot(engine: Engine, waiting: int) -> dict:
    """What /metrics reads from the engine (call in the engine thread)."""
    sched = engine.scheduler
    pool = engine.layout.num_blocks - 1
    out = {
        "running": len(sched.running),
        "waiting": waiting,
        "cache_usage": (pool - sched.alloc.free_blocks) / max(pool, 1),
        "speculative": engine.speculative_stats,
        "prefix_cache": engine.prefix_cache_stats(),
        "expert_load": None,
    }
    if engine.cfg.num_moe_layers:
        load = engine.expert_load().load
        out["expert_load"] = (load.max(-1), load.mean(-1))
    return out


class _Snapshot:
    """A collector of the gauges of the last `snapshot` (set before each scrape)."""

    def __init__(self):
        self.values: dict | None = None

    def collect(self):
        s = self.values
        if s is None:
            return
        for name, doc, value in (
            ("num_requests_running", "Requests in decode slots.", s["running"]),
            ("num_requests_waiting", "Requests waiting for a decode slot.", s["waiting"]),
            ("kv_cache_usage_perc", "Share of latent-cache blocks in use (1 = full).", s["cache_usage"]),
        ):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        prefix = s["prefix_cache"]
        yield CounterMetricFamily(
            PREFIX + "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            value=prefix.queried_tokens,
        )
        yield CounterMetricFamily(
            PREFIX + "prefix_cache_hits",
            "Prompt tokens served from the prefix cache.",
            value=prefix.hit_tokens,
        )
        spec = s["speculative"]
        if spec:
            yield CounterMetricFamily(
                PREFIX + "spec_decode_num_draft_tokens", "MTP draft tokens proposed.", value=spec["drafted"]
            )
            yield CounterMetricFamily(
                PREFIX + "spec_decode_num_accepted_tokens",
                "MTP draft tokens accepted.",
                value=spec["accepted"],
            )
            yield GaugeMetricFamily(
                PREFIX + "spec_decode_draft_acceptance_rate",
                "Accepted / proposed MTP draft tokens.",
                value=spec["acceptance_rate"],
            )
        if s["expert_load"] is not None:
            for stat, values in zip(("max", "mean"), s["expert_load"]):
                family = GaugeMetricFamily(
                    PREFIX + f"expert_load_{stat}",
                    f"Per MoE layer: the {stat} over routed experts of the tokens routed to each.",
                    labels=["layer"],
                )
                for layer, value in enumerate(values):
                    family.add_metric([str(layer)], float(value))
                yield family


class Metrics:
    def __init__(self):
        disable_created_metrics()  # no `_created` timestamp series beside each counter
        self.registry = CollectorRegistry()
        self.engine_view = _Snapshot()
        self.registry.register(self.engine_view)
        r = self.registry
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of requests served.", registry=r
        )
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between tokens of a request."
        )
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Arrival to the last token.")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to admission into a decode slot.")

    def finished(self, reason: str, latency: float) -> None:
        self.request_success.labels(reason).inc()
        self.e2e_latency.observe(latency)

    def render(self, engine_snapshot: dict) -> bytes:
        self.engine_view.values = engine_snapshot
        return generate_latest(self.registry)
