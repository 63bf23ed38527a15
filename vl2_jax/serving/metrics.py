"""The server's Prometheus metrics, in a registry of their own (several apps can live in one process).

    vl2_queue_length                     gauge: requests waiting for a slot
    vl2_running_requests                 gauge: requests holding a slot (prefilling or decoding)
    vl2_time_to_first_token_seconds      histogram: from a request's arrival to its first token (image
                                         decoding and the processor included)
    vl2_inter_token_latency_seconds      histogram: between a request's tokens
    vl2_e2e_request_latency_seconds      histogram: from arrival to the last token
    vl2_generated_tokens_total           counter: answer tokens (its rate is the tokens per second)
    vl2_prompt_tokens_total              counter: prompt tokens of the requests that began answering
    vl2_prefix_cache_hits_total          counter: prompt tokens served from the prefix cache
    vl2_prefix_cache_queries_total       counter: prompt tokens looked up in the prefix cache (the hit
                                         rate is hits / queries)
    vl2_requests_total{route, status}    counter: answered requests by route and HTTP status (a stream by
                                         its outcome: an error event's status, 499 where the client left)

`Metrics` carries the scheduler's hooks (`observe_itl`, `add_tokens`, `set_queue`, `set_running`,
`cache_lookup`); the first-token time is observed by the API (`first_token`), which knows when the
request arrived, so `scheduler_hooks()` hands the scheduler everything but that.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("vl2_queue_length", "Requests waiting for a slot.", registry=r)
        self.running = Gauge("vl2_running_requests", "Requests holding a slot (prefilling or decoding).", registry=r)
        self.ttft = Histogram("vl2_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vl2_inter_token_latency_seconds", "Between a request's tokens.",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("vl2_e2e_request_latency_seconds", "From a request's arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("vl2_generated_tokens", "Answer tokens generated.", registry=r)
        self.prompt = Counter("vl2_prompt_tokens", "Prompt tokens of the requests that began answering.", registry=r)
        self.cache_hits = Counter("vl2_prefix_cache_hits", "Prompt tokens served from the prefix cache.", registry=r)
        self.cache_queries = Counter("vl2_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                     registry=r)
        self.requests = Counter("vl2_requests", "Answered requests by route and HTTP status.", ["route", "status"],
                                registry=r)

    # -- the scheduler's hooks (its device thread calls them) -------------------------------------------
    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def add_tokens(self, n: int) -> None:
        self.generated.inc(n)

    def set_queue(self, n: int) -> None:
        self.queue.set(n)

    def set_running(self, n: int) -> None:
        self.running.set(n)

    def cache_lookup(self, hit_tokens: int, prompt_tokens: int) -> None:
        self.cache_hits.inc(hit_tokens)
        self.cache_queries.inc(prompt_tokens)

    # -- the API's -------------------------------------------------------------------------------------
    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt.inc(prompt_tokens)

    def finished(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def answered(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def scheduler_hooks(self) -> _SchedulerHooks:
        """What the scheduler's `metrics` argument takes: these metrics, the first-token time left out
        (the API observes it from the request's arrival)."""
        return _SchedulerHooks(self)

    def exposition(self) -> tuple[bytes, str]:
        """(the text format of every metric, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SchedulerHooks:
    def __init__(self, metrics: Metrics):
        self.observe_itl, self.add_tokens = metrics.observe_itl, metrics.add_tokens
        self.set_queue, self.set_running, self.cache_lookup = metrics.set_queue, metrics.set_running, metrics.cache_lookup

    def observe_ttft(self, seconds: float) -> None:
        """(observed by the API instead, image decoding and the processor included)"""
