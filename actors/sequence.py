"""A request as the engine sees it: its tokens, sampling settings and place in the KV cache."""

import enum
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded and when it stops. Validated on construction."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            ("max_tokens", self.max_tokens, _is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature, _is_real(self.temperature) and 0 <= self.temperature < math.inf,
             ">= 0 (and finite)"),
            ("top_p", self.top_p, _is_real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0"),
            ("seed", self.seed, self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64),
             "None or an integer in [0, 2**64)"),
            ("stop", self.stop, isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
             "a tuple of non-empty strings"),
            ("ignore_eos", self.ignore_eos, isinstance(self.ignore_eos, bool), "True or False"),
        ]
        for name, value, ok, want in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} must be {want}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state. `num_computed` tokens have their K/V in the cache (`block_table`)."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    finish_reason: str | None = None  # "length" | "stop"

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V still has to be computed (the prompt, or the last sampled token)."""
        return self.num_tokens - self.num_computed
