"""`RouterActor`: the Ray shell around `Router` — request intake, token streaming, plan changes.

The step loop runs on one thread and owns the router; other calls talk to it through queues,
so the engine is never touched from two threads. Requests come in through `submit` and their
items go out through `subscribe`, one streaming generator per ingress whose every item carries
one step's new tokens for all of that ingress's requests (`cluster.resume` is the other end).
"""

import collections
import logging
import os
import queue
import threading
import time

import ray
import torch

from moeray.actors.comm import World, WorldSpec, host_store
from moeray.actors.engine import EngineConfig, Resume
from moeray.actors.client_load import ClientPolicy, TokenBucket, concentration
from moeray.actors.placement import PlacementPlan
from moeray.actors.request_stats import RequestStats
from moeray.actors.router import ANONYMOUS, Router
from moeray.actors.sequence import SamplingParams

log = logging.getLogger("moeray.router")
RECOVERY_TIMEOUT_S = 60.0  # a broken world not re-formed by then fails the requests it holds
IDLE_HEADER_S = 1.0  # how often an idle router tells the groups it is alive (well under the world timeout)


MAX_STREAMS = 1024  # concurrent `generate` streams; control calls have their own threads


class OverloadedError(RuntimeError):
    """The router's queue is full: the request was refused, not queued (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


class RouterRestarting(RuntimeError):
    """This router process is new (Ray restarted it after the old one died) and is not serving yet:
    the ingress waits and resubmits (`cluster.resume`)."""


class Tagged:
    """Where one submission's items go: its subscription's queue, as (tag, item)."""

    def __init__(self, box: queue.Queue, tag: str):
        self.box, self.tag = box, tag

    def put(self, item: dict | Exception) -> None:
        self.box.put((self.tag, item))


@ray.remote(max_concurrency=8, concurrency_groups={"streams": MAX_STREAMS})
class RouterActor:
    def __init__(self, model_path: str, plan_json: str, dtype: str, engine_config: EngineConfig, num_threads: int,
                 max_queued_requests: int = 256, client_policy: ClientPolicy = ClientPolicy()):
        torch.set_num_threads(num_threads)
        self.max_queued_requests = max_queued_requests  # waiting (not yet running) requests beyond which new ones are refused
        self._args = (model_path, PlacementPlan.from_json(plan_json), getattr(torch, dtype), engine_config)
        self.loaded = (0, 0)  # (layers loaded, layers), for progress()
        self.client_policy = client_policy
        rate = client_policy.token_rate_limit
        self.buckets = TokenBucket(rate, rate * client_policy.token_burst_s) if rate else None
        self.flagged: set[str] = set()  # clients flagged for expert saturation (logged once each)
        self.broken: str | None = None  # why the world broke, while waiting for its re-formation
        self.recoveries, self.last_recovery_s = 0, None
        self.router: Router | None = None
        self.store, self.port = host_store()
        self.inbox: queue.Queue = queue.Queue()
        self._tasks: queue.Queue = queue.Queue()  # (callable, done queue) run between steps
        self.subscribers: dict[str, queue.Queue] = {}  # subscription -> its stream's queue of (tag, item)
        self.streams: dict[int, Tagged] = {}  # seq id -> where that request's items go
        self.seq_ids: dict[str, int] = {}  # request id -> seq id, while it runs
        self.request_ids: dict[int, str] = {}  # and back
        self._cancelled: set[str] = set()  # request ids aborted before they were admitted
        self.groups: list = []
        self.staging: tuple[PlacementPlan, list] | None = None
        self.error: str | None = None
        self.staging_error: str | None = None
        self._running = False
        self._loop: threading.Thread | None = None
        self.steps = collections.deque(maxlen=8192)  # (wall time at end, seconds, tokens, staging?, running seqs)
        self.request_stats = RequestStats()
        self.computed_tokens = 0  # tokens all steps computed (prompt chunks + decodes): every MoE layer saw each

    def load(self, plan_json: str | None = None) -> None:
        """Build the dense model from the checkpoint (slow: the deployer polls `progress` meanwhile).
        With `plan_json` (a restarted router) serve that plan, the one the groups hold, instead of
        the one this actor was created with."""
        if plan_json is not None:
            self._args = (self._args[0], PlacementPlan.from_json(plan_json), *self._args[2:])
        self.router = Router(*self._args, progress=lambda done, total: setattr(self, "loaded", (done, total)))

    def pid(self) -> int:
        """The router's process id (the router-failure test and `bench/chaos.py` SIGKILL it)."""
        return os.getpid()

    def state(self) -> str:
        """'new' (not loaded: just created, or restarted by Ray after a crash), 'loaded' or 'serving'."""
        return "serving" if self._running else "loaded" if self.router is not None else "new"

    def progress(self) -> tuple[int, int]:
        return self.loaded

    def rendezvous(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), self.port

    def join(self, spec: WorldSpec) -> None:
        self.router.join(World(spec, 0, self.store))

    def start(self, groups: list) -> None:
        self.groups = groups
        self._running = True
        self._loop = threading.Thread(target=self._step_loop, name="router-steps", daemon=True)
        self._loop.start()

    def submit(self, subscription: str, request_id: str, tag: str, prompt_ids: list[int], params: SamplingParams,
               client: str | None = None, resume: Resume | None = None) -> None:
        """Queue a request; its items go to `subscription`'s stream (`subscribe`) under `tag`, the
        submitter's name for this submission (a resubmission gets a new one, so that nothing the
        replaced one still emits can reach it). `request_id` names the request for `abort`, and a
        request submitted again replaces the running one. With `resume`, it is one that a router
        before this one had started (see `Engine.add_request`).

        Refused at once, not queued, when this router is not serving yet or does not know the
        subscription (RouterRestarting), when the queue is full or the client is over its token
        rate (OverloadedError); a request the engine rejects (ValueError) fails in the stream."""
        if not self._running:
            raise RouterRestarting("the router is starting (it was restarted); retry shortly")
        box = self.subscribers.get(subscription)
        if box is None:
            raise RouterRestarting(f"subscription {subscription!r} is not open on this router; subscribe, then resubmit")
        queued = self.inbox.qsize() + len(self.router.engine.batcher.waiting)
        if queued >= self.max_queued_requests and resume is None:  # a resumed request was admitted before
            raise OverloadedError(f"server overloaded: {queued} requests are already waiting "
                                  f"(max_queued_requests={self.max_queued_requests}); retry later")
        client = client or ANONYMOUS
        if self.buckets is not None and resume is None:
            wait = self.buckets.take(client, len(prompt_ids) + params.max_tokens, time.monotonic())
            if wait is not None:
                raise OverloadedError(f"client {client!r} is over its token rate "
                                      f"({self.client_policy.token_rate_limit:g} tokens/s); retry in {wait:.1f} s")
        self.inbox.put((list(prompt_ids), params, Tagged(box, tag), request_id, time.monotonic(), client, resume))

    @ray.method(concurrency_group="streams")
    def subscribe(self, subscription: str):
        """The stream of every request submitted under `subscription` ("INGRESS:N", a new N for
        each subscribe): each item is {tag: item or Exception}, an item being {token_ids, text,
        logprobs, finished, finish_reason}; the first item is {} (open: submit now). One Ray message
        per step for all of an ingress's requests, not one per request: the per-message cost is what
        a busy router's CPU goes to. Steps a slow subscriber missed are merged into one item.
        A newer subscription of the same ingress ends the older ones."""
        ingress = subscription.rsplit(":", 1)[0]
        for old in [s for s in self.subscribers if s.rsplit(":", 1)[0] == ingress]:
            self.subscribers.pop(old).put(None)
        box: queue.Queue = queue.Queue()
        self.subscribers[subscription] = box
        try:
            yield {}
            while (first := box.get()) is not None:
                batch: dict = {}
                for tag, item in _drain(first, box):
                    batch[tag] = item if tag not in batch else _merge(batch[tag], item)
                yield batch
        finally:
            if self.subscribers.get(subscription) is box:
                del self.subscribers[subscription]

    def abort(self, request_id: str) -> None:
        """Cancel a request (its client went away): its sequence and KV blocks are freed between steps."""
        def task():
            out = self._drop(request_id)
            if out is not None:
                out.put({"token_ids": [], "text": "", "logprobs": [], "finished": True, "finish_reason": "abort"})
            else:
                self._cancelled.add(request_id)  # not admitted yet (or already done: harmless)

        self._tasks.put((task, queue.Queue()))

    def _drop(self, request_id: str) -> Tagged | None:
        """Forget a running request (between steps) and free its sequence. -> where its items went."""
        seq_id = self.seq_ids.pop(request_id, None)
        if seq_id is None:
            return None
        self.request_ids.pop(seq_id, None)
        self.router.engine.abort(seq_id)
        self.request_stats.emitted(seq_id, time.monotonic(), 0, "abort")
        self.router.scheduled_at.pop(seq_id, None)
        self.router.clients.pop(seq_id, None)
        return self.streams.pop(seq_id, None)

    def set_plan(self, plan_json: str) -> int:
        """Stage a new plan on every group; it becomes active at the first step after all have it."""
        if self.staging is not None:
            raise RuntimeError(f"plan v{self.staging[0].version} is still staging")
        plan = PlacementPlan.from_json(plan_json, self.router.plan.num_experts)
        if plan.version <= self.router.plan.version:
            raise ValueError(f"plan version {plan.version} must be newer than the active v{self.router.plan.version}")
        self.staging = (plan, [g.stage.remote(plan.to_json()) for g in self.groups])
        return plan.version

    def stats(self) -> dict:
        return {"plan_version": self.router.plan.version, "step": self.router.step_id, "error": self.error,
                "staging_error": self.staging_error,
                "staging_version": self.staging[0].version if self.staging else None,
                "running": len(self.router.engine.batcher.running), "waiting": len(self.router.engine.batcher.waiting),
                "streams": len(self.streams), "free_kv_blocks": self.router.engine.cache.allocator.num_free,
                "kv_blocks": self.router.engine.cache.allocator.num_blocks, "broken": self.broken,
                "recoveries": self.recoveries, "last_recovery_s": self.last_recovery_s}

    def group_handles(self) -> list | None:
        """The expert-group actors of the world in force (after recoveries and resizes); None before
        this router serves (a restarted one does not know them)."""
        return list(self.groups) if self._running else None

    def group_nodes(self) -> list[int]:
        """Per group of the world in force, the index of its Ray node (0, 1, ... in order of first
        appearance): the planner keeps replicas of one expert on different nodes."""
        ids = ray.get([g.node_id.remote() for g in self.groups], timeout=30)
        index: dict[str, int] = {}
        return [index.setdefault(node, len(index)) for node in ids]

    def limits(self) -> dict:
        """What the ingress validates requests against."""
        engine = self.router.engine
        return {"max_model_len": engine.max_model_len, "vocab_size": engine.model.config.vocab_size,
                "max_num_seqs": engine.batcher.max_num_seqs}

    def load_snapshot(self, window_s: float | None = None) -> dict:
        """Tokens per logical expert over the last `window_s` seconds, with the derived group load
        and imbalance under the active plan (`LoadSnapshot.to_dict`). Read between steps."""
        return self._between_steps(lambda: self.router.tracker.snapshot(self.router.plan, window_s).to_dict())

    def metrics(self) -> dict:
        """Everything the Prometheus endpoint exposes from the router, in one call: request stats,
        queue gauges, tokens per expert since start, the window's group load and imbalance, replicas."""
        return self._between_steps(self._metrics)

    def _metrics(self) -> dict:
        batcher, plan = self.router.engine.batcher, self.router.plan
        snapshot = self.router.tracker.snapshot(plan, window_s=60.0)
        return {"requests": self.request_stats.to_dict(), "running": len(batcher.running),
                "waiting": len(batcher.waiting) + self.inbox.qsize(), "computed_tokens": self.computed_tokens,
                "steps": self.router.step_id, "plan_version": plan.version, "top_k": self.router.engine.model.config.top_k,
                "expert_tokens_total": snapshot.total.tolist(), "window_s": snapshot.window_s,
                "group_load": snapshot.group_load.tolist(), "imbalance": snapshot.imbalance.tolist(),
                "replica_count": plan.replica_count.tolist(), "kv_blocks": self.router.engine.cache.allocator.num_blocks,
                "free_kv_blocks": self.router.engine.cache.allocator.num_free}

    def clients(self) -> list[dict]:
        """Per client (busiest first): routed pairs, concentration score, its hot experts per layer, and
        whether it is flagged for expert saturation. A newly flagged client is logged once."""
        counts = self._between_steps(self.router.link.client_load.counts)
        top = self.router.engine.model.config.top_k
        policy, rows = self.client_policy, []
        for client, info in concentration(counts, top).items():
            flagged = info["pairs"] >= policy.saturation_min_pairs and info["score"] >= policy.saturation_score
            if flagged and client not in self.flagged:
                self.flagged.add(client)
                log.warning("client %r looks like expert saturation: score %.2f over %d routed pairs "
                            "(its traffic concentrates on experts %s of layer 0)",
                            client, info["score"], info["pairs"], info["hot_experts"][0])
            rows.append({"client": client, **info, "flagged": flagged})
        return sorted(rows, key=lambda r: -r["pairs"])

    def step_log(self, since: float = 0.0) -> list[tuple[float, float, int, bool, int]]:
        """Recent steps (up to 8192) that ended after wall time `since`: (end time, seconds, tokens,
        whether a plan was staging meanwhile, sequences running after it) — for benchmarks, latency
        metrics and the scaling policy's batch occupancy."""
        return [s for s in list(self.steps) if s[0] > since]

    def plan_json(self) -> str:
        return self.router.plan.to_json()

    def reform(self, spec: WorldSpec, plan_json: str | None = None, groups: list | None = None) -> None:
        """Leave the world at the next step boundary and join `spec` (a new generation, possibly
        other members). Returns once the new world is formed; requests in flight just wait.
        With `plan_json` and `groups` the pool changed: the new world runs that plan (of another
        group count) with those group actors, from its first step."""
        if (plan_json is None) != (groups is None):
            raise ValueError("a new pool needs both its plan and its group actors")
        if plan_json is not None and self.staging is not None:
            if self.broken is None:
                raise RuntimeError(f"plan v{self.staging[0].version} is still staging; re-form after it is active")
            self.staging_error = f"plan v{self.staging[0].version} dropped: the world was re-formed after a failure"
            self.staging = None
        plan = PlacementPlan.from_json(plan_json, self.router.plan.num_experts) if plan_json is not None else None
        done: queue.Queue = queue.Queue()

        def task():
            self.router.leave()
            if plan is not None:
                self.router.link.plan, self.router.next_plan, self.groups = plan, None, list(groups)
            self.router.join(World(spec, 0, self.store))

        self._tasks.put((task, done))
        error = done.get()
        if error is not None:
            raise error

    def shutdown(self) -> None:
        self._running = False
        for box in list(self.subscribers.values()):
            box.put(None)  # ends its stream
        if self._loop is not None:
            self._loop.join(timeout=30)

    def _step_loop(self) -> None:
        last_header = time.monotonic()
        try:
            while self._running:
                self._run_tasks()
                self._admit()
                self._check_staging()
                if self.router.engine.has_unfinished:
                    start = time.perf_counter()
                    outputs = self._step()
                    self.steps.append((time.time(), time.perf_counter() - start, self.router.last_step_tokens,
                                       self.staging is not None, len(self.router.engine.batcher.running)))
                    self.computed_tokens += self.router.last_step_tokens
                    for out in outputs:
                        self._emit(out)
                    last_header = time.monotonic()
                elif self.router.next_plan is not None or time.monotonic() - last_header > IDLE_HEADER_S:
                    try:
                        self.router.idle()
                        broken = None
                    except Exception as err:  # a group died while idle: same recovery as mid-step
                        broken = f"{type(err).__name__}: {err}"
                    if broken is not None:
                        self._await_recovery(broken)
                    last_header = time.monotonic()
                else:
                    self._wait_for_request(0.05)
            self.router.stop()
        except Exception as err:  # a broken world: fail every open stream, keep the reason
            self.error = f"{type(err).__name__}: {err}"
            for out in self.streams.values():
                out.put(RuntimeError(f"router step failed: {self.error}"))
            self.streams.clear()
        finally:
            if self.router.link.world is not None:
                self.router.link.world.destroy()

    def _step(self) -> list:
        """One step; if the world breaks (a group died), wait for the owner to re-form it without the
        lost group (`reform`, called by `Deployment.recover`) and run the same batch again."""
        batch = self.router.engine.batcher.schedule()
        if not batch.seqs:
            return []
        while True:
            try:
                return self.router.run(batch)
            except Exception as err:  # the world broke under this step
                broken = f"{type(err).__name__}: {err}"
            self._await_recovery(broken)  # outside the except: see _await_recovery

    def _await_recovery(self, broken: str) -> None:
        """Destroy the broken world and wait (serving paused, requests kept) until a re-formation
        task runs; RuntimeError after RECOVERY_TIMEOUT_S, which fails the open streams.

        Called with the error's text only, after its handler ended: the traceback's frames hold the
        step's in-flight send/recv works, and while any is referenced the process group lives on
        and keeps its sockets open, so the surviving groups would not see the world end and would
        sit in their next receive until the world timeout, stalling the recovery."""
        self.broken = broken
        started = time.monotonic()
        log.warning("the expert world broke mid-step (%s); waiting for it to be re-formed", self.broken)
        if self.router.link.world is not None:
            self.router.link.world.destroy()
            self.router.link.world = None
        while self.router.link.world is None:
            if time.monotonic() - started > RECOVERY_TIMEOUT_S:
                raise RuntimeError(f"no recovery within {RECOVERY_TIMEOUT_S:.0f} s after: {self.broken}")
            try:
                task, done = self._tasks.get(timeout=0.1)
            except queue.Empty:
                continue
            self._run_task(task, done)  # a failed re-formation: its caller hears; we wait for another
        self.recoveries += 1
        self.last_recovery_s = time.monotonic() - started
        log.warning("recovered in %.2f s; replaying the step", self.last_recovery_s)
        self.broken = None

    def _between_steps(self, read):
        """`read()` on the step thread between two steps (now, if the loop is not running)."""
        if self._loop is None or not self._loop.is_alive():
            return read()
        done: queue.Queue = queue.Queue()

        def task():
            try:
                done.put((read(), None))
            except Exception as err:  # the caller's problem, never the step loop's
                done.put((None, err))

        self._tasks.put((task, queue.Queue()))
        result, error = done.get(timeout=60)
        if error is not None:
            raise error
        return result

    def _run_tasks(self) -> None:
        """Control work that must run between steps, on the thread that owns the world."""
        while True:
            try:
                task, done = self._tasks.get_nowait()
            except queue.Empty:
                return
            error = self._run_task(task, done)
            if error is not None:
                raise error

    @staticmethod
    def _run_task(task, done: queue.Queue) -> Exception | None:
        """Run one control task; its error (or None) goes back to the caller waiting on `done`."""
        try:
            task()
            done.put(None)
            return None
        except Exception as err:
            done.put(err)
            return err

    def _wait_for_request(self, timeout: float) -> None:
        try:
            self._admit_one(*self.inbox.get(timeout=timeout))
        except queue.Empty:
            pass

    def _admit(self) -> None:
        while True:
            try:
                self._admit_one(*self.inbox.get_nowait())
            except queue.Empty:
                return

    def _admit_one(self, prompt_ids: list[int], params: SamplingParams, out: Tagged, request_id: str,
                   arrival: float, client: str, resume: Resume | None) -> None:
        self._drop(request_id)  # submitted again (its ingress lost track of it): the new one replaces it
        if request_id in self._cancelled:
            self._cancelled.discard(request_id)
            out.put({"token_ids": [], "text": "", "logprobs": [], "finished": True, "finish_reason": "abort"})
            return
        try:
            seq_id = self.router.engine.add_request(prompt_ids, params, resume)
        except ValueError as err:  # a bad request fails alone; the server keeps serving
            out.put(err)
            return
        self.streams[seq_id] = out
        self.router.clients[seq_id] = client
        self.request_stats.admitted(seq_id, arrival, len(prompt_ids))
        self.seq_ids[request_id], self.request_ids[seq_id] = seq_id, request_id

    def _emit(self, out) -> None:
        item = {"token_ids": out.new_token_ids, "text": out.new_text, "logprobs": out.new_logprobs,
                "finished": out.finished, "finish_reason": out.finish_reason}
        arrival = self.request_stats.awaiting_first_token(out.seq_id)
        if out.new_token_ids and arrival is not None:  # its first token: say how long it queued
            item["timing"] = {"queue_s": self.router.scheduled_at.get(out.seq_id, arrival) - arrival}
        self.request_stats.emitted(out.seq_id, time.monotonic(), len(out.new_token_ids),
                                   out.finish_reason if out.finished else None)
        if out.finished:
            self.router.scheduled_at.pop(out.seq_id, None)
            self.router.clients.pop(out.seq_id, None)
        stream = self.streams.get(out.seq_id)
        if stream is None:
            return
        stream.put(item)
        if out.finished:
            del self.streams[out.seq_id]
            self.seq_ids.pop(self.request_ids.pop(out.seq_id, None), None)

    def _check_staging(self) -> None:
        if self.staging is None:
            return
        plan, refs = self.staging
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(done) < len(refs):
            return
        self.staging = None
        try:
            ray.get(done)
        except ray.exceptions.RayError as err:  # a group could not stage: keep serving the active plan
            self.staging_error = f"plan v{plan.version} was not staged: {err}"
            return
        self.router.next_plan = plan


def _drain(first, box: queue.Queue):
    """`first`, then whatever else is in `box` now (a None, the end, goes back for the next look)."""
    yield first
    while True:
        try:
            item = box.get_nowait()
        except queue.Empty:
            return
        if item is None:
            box.put(None)
            return
        yield item


def _merge(first: dict | Exception, second: dict | Exception) -> dict | Exception:
    """Two consecutive stream items as one (an error wins)."""
    if isinstance(first, Exception):
        return first
    if isinstance(second, Exception):
        return second
    merged = {"token_ids": first["token_ids"] + second["token_ids"], "text": first["text"] + second["text"],
              "logprobs": first["logprobs"] + second["logprobs"], "finished": second["finished"],
              "finish_reason": second["finish_reason"]}
    if "timing" in first or "timing" in second:
        merged["timing"] = first.get("timing") or second.get("timing")
    return merged
