"""The in-process engine: continuous batching over a paged KV cache, token streaming, stops.

`Engine.step()` reads like the design: schedule -> run the model -> sample -> hand out tokens.
The distributed router reuses the same batcher, KV cache and runner; only the MoE layers'
experts change (they are dispatched to expert groups instead of computed here).
"""

import itertools
import operator
from dataclasses import dataclass, field

import torch

from moeray.actors.batcher import Batcher, ScheduledBatch
from moeray.actors.detokenizer import TextStream
from moeray.actors.kv_cache import KVCache
from moeray.actors.model_runner import ModelRunner
from moeray.actors.sequence import SamplingParams, Sequence
from moeray.kernels.sampling import greedy, sample
from moeray.models.model import MoEModel
from moeray.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (long prompts are prefilled in chunks)
    kv_cache_bytes: int = 256 << 20
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes", "block_size", "max_model_len"):
            value = getattr(self, name)
            if value is None and name == "max_model_len":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    seq_id: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    new_logprobs: list[float] = field(default_factory=list)  # log p(token) under the model, per new token


@dataclass(frozen=True)
class Resume:
    """Where a request stood when its router died: the tokens it had generated (all streamed to
    its client) and the text streamed with them (a stop string may still complete across the cut)."""

    output_ids: tuple[int, ...] | list[int] = ()
    text: str = ""


@dataclass
class Completion:
    """A finished request: generated ids only (not the prompt) and their text."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, model: MoEModel, tokenizer: Tokenizer | None = None, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.cache = KVCache(model.config, model.dtype, config.kv_cache_bytes, config.block_size)
        self.batcher = Batcher(self.cache.allocator, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.cache)
        # A sequence never outgrows the KV cache: were it allowed to, once alone it could neither
        # grow nor be preempted into fitting, and the engine would spin on empty steps forever.
        kv_capacity = self.cache.allocator.num_blocks * self.cache.allocator.block_size
        if config.max_model_len is not None and config.max_model_len > kv_capacity:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the {kv_capacity} tokens the KV cache "
                             f"holds (kv_cache_bytes={config.kv_cache_bytes}); raise kv_cache_bytes or lower max_model_len")
        self.max_model_len = min(config.max_model_len or model.config.max_position_embeddings,
                                 model.config.max_position_embeddings, kv_capacity)
        self._ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._texts: dict[int, TextStream] = {}

    @property
    def has_unfinished(self) -> bool:
        return self.batcher.has_work

    def add_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    resume: Resume | None = None) -> int:
        """Queue a request; it joins the running batch at the next step. -> its id.

        With `resume`, the request picks up where another engine left it (its router died): the
        tokens it had generated are prefilled with the prompt and count towards `max_tokens`, and
        the next token is the one that engine would have produced next (greedy, or seeded: see
        `_sample`). Raises ValueError, naming the offending value, for a request that cannot run;
        the engine and the requests already queued are untouched by it."""
        prompt_ids = self._validate(prompt_ids, params)
        resume = self._validate_resume(resume or Resume(), prompt_ids, params)
        seq = Sequence(next(self._ids), prompt_ids, params, output_ids=list(resume.output_ids))
        self._seqs[seq.seq_id] = seq
        self._generators[seq.seq_id] = None if params.seed is None else torch.Generator()
        if self.tokenizer is not None:
            self._texts[seq.seq_id] = TextStream(self.tokenizer, params.stop, emitted=resume.text)
        self.batcher.add(seq)
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.batcher.finish(seq)
            self._forget(seq_id)

    def step(self) -> list[RequestOutput]:
        batch = self.batcher.schedule()
        return self.execute(batch) if batch.seqs else []

    def execute(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Run a scheduled batch: model forward, sample, hand out the new tokens."""
        logits = self.runner.run(batch)  # [S, V]
        sampled = [seq for seq, samples in zip(batch.seqs, batch.samples) if samples]
        tokens = self._sample(sampled, logits)  # [S]
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # [S]
        return [self._append(seq, token, logprob)
                for seq, token, logprob in zip(sampled, tokens.tolist(), logprobs.tolist())]

    def generate(self, prompts: list[list[int]], params: SamplingParams = SamplingParams()) -> list[Completion]:
        """Run prompts to completion together (continuous batching); results in prompt order."""
        ids = [self.add_request(p, params) for p in prompts]
        done = {i: Completion() for i in ids}
        while self.has_unfinished:
            for out in self.step():
                done[out.seq_id].token_ids += out.new_token_ids
                done[out.seq_id].text += out.new_text
                done[out.seq_id].finish_reason = out.finish_reason
                done[out.seq_id].logprobs += out.new_logprobs
        return [done[i] for i in ids]

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """-> the prompt as a list of Python ints; ValueError for a request that cannot run."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params={params!r} must be a SamplingParams")
        vocab = self.model.config.vocab_size
        ids = [_token_id(t) for t in prompt_ids]  # numpy / 0-d tensor ids -> int
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                             "(the prompt and at least one generated token must fit)")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs a tokenizer; this engine has none")
        return ids

    def _validate_resume(self, resume: Resume, prompt_ids: list[int], params: SamplingParams) -> Resume:
        ids = [_token_id(t, "resume token id") for t in resume.output_ids]
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"resume token id {bad[0]} is out of range [0, {vocab})")
        if len(ids) >= params.max_tokens:
            raise ValueError(f"resume has {len(ids)} tokens; max_tokens={params.max_tokens} leaves none to generate")
        if len(prompt_ids) + len(ids) >= self.max_model_len:
            raise ValueError(f"prompt and resume have {len(prompt_ids) + len(ids)} tokens; max_model_len is "
                             f"{self.max_model_len}")
        if not isinstance(resume.text, str):
            raise ValueError(f"resume text {resume.text!r} must be a string")
        return Resume(ids, resume.text)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """A seeded request's n-th token draws from a generator seeded by (seed, n), not from one
        generator running on: the draw depends only on the request, so it is the same in any batch
        and after a resume on another engine."""
        if all(s.params.temperature == 0 for s in seqs):  # all greedy: what `sample` does, without its setup
            return greedy(logits)
        for seq in seqs:
            generator = self._generators[seq.seq_id]
            if generator is not None:
                generator.manual_seed(token_seed(seq.params.seed, len(seq.output_ids)))
        temperature = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
        top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32)
        return sample(logits, temperature, top_k, top_p, [self._generators[s.seq_id] for s in seqs])

    def _append(self, seq: Sequence, token: int, logprob: float) -> RequestOutput:
        seq.output_ids.append(token)
        params = seq.params
        if not params.ignore_eos and token in self.model.config.eos_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        text = ""
        stream = self._texts.get(seq.seq_id)
        if stream is not None:
            text = stream.push(seq.output_ids, finished=seq.finish_reason is not None)
            if stream.stopped:
                seq.finish_reason = "stop"
        finished = seq.finish_reason is not None
        if finished:
            self.batcher.finish(seq)
            self._seqs.pop(seq.seq_id)
            self._forget(seq.seq_id)
        return RequestOutput(seq.seq_id, [token], text, finished, seq.finish_reason, [logprob])

    def _forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)
        self._texts.pop(seq_id, None)


def token_seed(seed: int, index: int) -> int:
    """The generator seed of a seeded request's `index`-th generated token (a 64-bit mix of both)."""
    return (seed + (index + 1) * 0x9E3779B97F4A7C15) % 2**64


def _token_id(token, what: str = "prompt token id") -> int:
    try:
        if isinstance(token, bool):
            raise TypeError
        return operator.index(token)
    except TypeError:
        raise ValueError(f"{what} {token!r} is not an integer") from None
