"""`RequestStats`: the router's request-level counters and latency histograms (pure, no Prometheus).

The router sees every request from arrival to its last token, so it is where time to first
token, inter-token latency and end-to-end latency are measured — with the meaning vLLM gives
them: TTFT from arrival (the `generate` call) to the first output token leaving the router; ITL
per output token after the first (a step that emits k tokens for one request, e.g. a merged
stream item, counts k gaps of 1/k of the time); E2E from arrival to the last token. Histograms
have fixed buckets (vLLM's), so the metrics endpoint can expose them as Prometheus histograms
summed over time; `to_dict` is what `RouterActor.metrics()` returns.
"""

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]  # upper bounds, ascending; +Inf is implicit
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), len(buckets) + 1
    sum: float = 0.0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}


@dataclass
class _Open:
    arrival: float
    last: float | None = None  # when its previous tokens left


class RequestStats:
    def __init__(self):
        self.ttft, self.itl, self.e2e = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.open: dict[int, _Open] = {}  # seq id -> timing of a request in flight

    def admitted(self, seq_id: int, arrival: float, prompt_tokens: int) -> None:
        self.open[seq_id] = _Open(arrival)
        self.prompt_tokens += prompt_tokens

    def awaiting_first_token(self, seq_id: int) -> float | None:
        """The request's arrival time while it has no output token yet, else None."""
        timing = self.open.get(seq_id)
        return timing.arrival if timing is not None and timing.last is None else None

    def emitted(self, seq_id: int, now: float, num_tokens: int, finish_reason: str | None) -> None:
        """A step's output for one request: `num_tokens` new tokens, finished if `finish_reason`."""
        timing = self.open.get(seq_id)
        if timing is None:
            return
        if num_tokens:
            self.generation_tokens += num_tokens
            if timing.last is None:
                self.ttft.observe(now - timing.arrival)
                if num_tokens > 1:
                    self.itl.observe(0.0, num_tokens - 1)
            else:
                self.itl.observe((now - timing.last) / num_tokens, num_tokens)
            timing.last = now
        if finish_reason is not None:
            self.e2e.observe(now - timing.arrival)
            self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
            del self.open[seq_id]

    def to_dict(self) -> dict:
        return {"ttft": self.ttft.to_dict(), "itl": self.itl.to_dict(), "e2e": self.e2e.to_dict(),
                "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
                "finished": dict(self.finished)}
