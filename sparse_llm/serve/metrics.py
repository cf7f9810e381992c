"""Prometheus metrics of the server (vLLM's names with the `sparse_llm:` prefix).

Request-level histograms are observed when a request ends; engine-level values (running / waiting
requests, KV blocks, token totals, achieved sparsity per phase and per layer) are read from the
engine's stats at scrape time by a custom collector, so they are never stale.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sparse_llm.engine.outputs import EngineStats, RequestOutput

P = "sparse_llm:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class EngineStatsCollector(Collector):
    """Turns one `EngineStats` snapshot into gauges and counters at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self._stats = stats
        self._model = model_name

    def collect(self):
        s = self._stats()
        m = ["model_name"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(P + name, doc, labels=m)
            g.add_metric([self._model], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(P + name, doc, labels=m)
            c.add_metric([self._model], value)
            return c

        yield gauge("num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_blocks_total", "KV cache blocks in all.", s.kv_blocks_total)
        yield gauge("kv_blocks_used", "KV cache blocks in use.", s.kv_blocks_used)
        yield gauge("kv_blocks_free", "KV cache blocks free.", s.kv_blocks_free)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", s.kv_usage)
        yield counter("prompt_tokens", "Prompt tokens admitted.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", s.cached_tokens_total)
        yield counter("num_preemptions", "Sequences preempted for lack of KV blocks.", s.num_preemptions)
        phase = GaugeMetricFamily(
            P + "achieved_sparsity", "Skipped / total attention work over all sparse layers so far (absent: dense).",
            labels=m + ["phase"],
        )
        for name, value in s.sparsity.items():
            if value is not None:
                phase.add_metric([self._model, name], value)
        yield phase
        pre = GaugeMetricFamily(
            P + "pre_skipped_fraction", "Of all attention tiles, the fraction skipped before QK^T by the key bound "
            "(bound_skip; included in achieved_sparsity).", labels=m + ["phase"],
        )
        for name, value in s.pre_skipped.items():
            if value is not None:
                pre.add_metric([self._model, name], value)
        yield pre
        layer = GaugeMetricFamily(
            P + "layer_achieved_sparsity", "Skipped / total attention work of one sparse layer so far.",
            labels=m + ["layer", "phase"],
        )
        for idx, phases in sorted(s.layer_sparsity.items()):
            for name, value in phases.items():
                if value is not None:
                    layer.add_metric([self._model, str(idx), name], value)
        yield layer


class ServerMetrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.http_requests = Counter(
            P + "http_requests", "HTTP requests by route and status code.", ["route", "status"], registry=self.registry
        )
        self.request_finished = Counter(
            P + "request_success", "Finished generation requests by finish reason.", labels + ["finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to the first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time per output token after the first.",
                              labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineStatsCollector(stats, model_name))

    def observe_finished(self, out: RequestOutput) -> None:
        """Record one request's latencies and finish reasons (called once, with its last output)."""
        m = out.metrics
        for o in out.outputs:
            self.request_finished.labels(self.model_name, o.finish_reason or "abort").inc()
        if m.ttft is not None:
            self.ttft.labels(self.model_name).observe(m.ttft)
        if m.decode_time is not None and m.num_generated_tokens > len(out.outputs):
            self.tpot.labels(self.model_name).observe(m.decode_time / (m.num_generated_tokens / len(out.outputs) - 1))
        if m.finished_time is not None:
            self.e2e.labels(self.model_name).observe(m.finished_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
