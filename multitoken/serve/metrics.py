"""The server's Prometheus metrics, in a registry of their own (one per server, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Counters, gauges and histograms that /metrics exposes, all prefixed `multitoken_`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "multitoken_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("multitoken_prompt_tokens", "Prompt tokens of finished rows", registry=r)
        self.generated_tokens = Counter("multitoken_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("multitoken_queue_depth", "Rows waiting for a batch slot", registry=r)
        self.batch_occupancy = Gauge("multitoken_batch_occupancy", "Rows in the running batch", registry=r)
        self.batch_capacity = Gauge("multitoken_batch_capacity", "Rows the batch can hold", registry=r)
        self.forward_passes = Counter("multitoken_forward_passes", "Batched decoding steps", registry=r)
        self.row_forwards = Counter(
            "multitoken_row_forwards", "Sum over decoding steps of the rows they advanced", registry=r
        )
        self.tokens_per_forward = Gauge(
            "multitoken_tokens_per_forward", "generated tokens / row forwards since start", registry=r
        )
        self.drafts_reached = Counter(
            "multitoken_drafts_reached", "Drafts judged, per drafting head offset", ["offset"], registry=r
        )
        self.drafts_accepted = Counter(
            "multitoken_drafts_accepted", "Drafts accepted, per drafting head offset", ["offset"], registry=r
        )
        self.acceptance = Gauge(
            "multitoken_acceptance",
            "accepted / reached drafts per head offset, since start",
            ["offset"],
            registry=r,
        )
        self.ttft = Histogram(
            "multitoken_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "multitoken_inter_token_latency_seconds",
            "Between successive token deliveries of a row, divided by the tokens delivered",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._generated = 0
        self._row_forwards = 0
        self._reached: dict[int, int] = {}
        self._accepted: dict[int, int] = {}

    def record_step(
        self, rows: int, new_tokens: int, reached: dict[int, int], accepted: dict[int, int]
    ) -> None:
        """One decoding step of `rows` rows that produced `new_tokens`; drafts judged/accepted per offset."""
        self.forward_passes.inc()
        self.row_forwards.inc(rows)
        self.generated_tokens.inc(new_tokens)
        self._generated += new_tokens
        self._row_forwards += rows
        self.tokens_per_forward.set(self._generated / max(self._row_forwards, 1))
        for offset, n in reached.items():
            self._reached[offset] = self._reached.get(offset, 0) + n
            self._accepted[offset] = self._accepted.get(offset, 0) + accepted.get(offset, 0)
            self.drafts_reached.labels(str(offset)).inc(n)
            self.drafts_accepted.labels(str(offset)).inc(accepted.get(offset, 0))
            if self._reached[offset]:
                self.acceptance.labels(str(offset)).set(self._accepted[offset] / self._reached[offset])
