"""`GET /metrics`: the server's counters in Prometheus' text format, as llama-server and vLLM offer them.

    internvl_edge_requests_total{status}            finished requests by HTTP status, or "cancelled"
                                                    (the client left before the answer ended)
    internvl_edge_prompt_tokens_total               prompt tokens of requests that ran
    internvl_edge_generation_tokens_total           tokens generated
    internvl_edge_active_sequences                  sequences in a KV slot now (gauge)
    internvl_edge_waiting_sequences                 requests waiting for a slot now (gauge)
    internvl_edge_time_to_first_token_seconds       arrival to first token (histogram)
    internvl_edge_request_duration_seconds          arrival to the end of the response (histogram)

The format is https://prometheus.io/docs/instrumenting/exposition_formats/ (text format 0.0.4), written
here rather than through prometheus-client so the server needs nothing more. Counters are updated once
per request, when its log line is written; the gauges are read from the engine when scraped.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "internvl_edge"
# seconds; first tokens come in well under a second for text and in seconds with images on a CPU
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts[:-1], strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.duration = Histogram(REQUEST_BUCKETS)

    def finished(self, status: str, prompt_tokens: int, generated: int, ttft_s: float | None, total_s: float) -> None:
        """One request ended: `status` its HTTP status, or "cancelled"."""
        with self.lock:
            self.requests[status] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.duration.observe(total_s)

    def text(self, active: int, waiting: int) -> str:
        p = PREFIX
        with self.lock:
            lines = [
                f"# HELP {p}_requests_total Finished chat completion requests by HTTP status, or cancelled.",
                f"# TYPE {p}_requests_total counter",
            ]
            lines += [f'{p}_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            counters = [
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of requests that ran."),
                ("generation_tokens_total", self.generation_tokens, "Tokens generated."),
            ]
            for name, value, what in counters:
                lines += [f"# HELP {p}_{name} {what}", f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
            for name, value, what in [
                ("active_sequences", active, "Sequences decoding in a KV cache slot."),
                ("waiting_sequences", waiting, "Requests waiting for a slot."),
            ]:
                lines += [f"# HELP {p}_{name} {what}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
            histograms = [
                ("time_to_first_token_seconds", self.ttft, "Request arrival to its first token."),
                ("request_duration_seconds", self.duration, "Request arrival to its end."),
            ]
            for name, hist, what in histograms:
                lines += [f"# HELP {p}_{name} {what}", f"# TYPE {p}_{name} histogram"] + hist.lines(f"{p}_{name}")
        return "\n".join(lines) + "\n"
