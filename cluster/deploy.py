"""Deploy a router and G expert groups onto a Ray cluster and form their world.

Resources: with GPUs in the cluster every expert group asks for one (`num_gpus=1`) and computes
its experts there; the world is gloo (see `_resources`); otherwise every actor asks for `num_cpus=0`
plus the memory its weights need, and sets its own torch thread count so actors on one machine do not
fight over cores. What the cluster cannot place is reported by name before anything starts,
and an actor that fails to start (say, a checkpoint its node cannot read) fails the deployment
with its own error instead of hanging.

`ClusterConfig.group_resources` replaces that choice with exactly the resources given, e.g.
`{"moeray_expert_group": 1}`: the worker node types in `cluster/launch/*.yaml` carry that custom
resource, so Ray's autoscaler adds a node when a group asks for one. Such a resource may not exist
yet when we start, so there is no up-front check then: we say what we wait for and wait up to
`start_timeout_s`.
"""

import asyncio
import os
import queue
import threading
import uuid
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import ray
import torch

from moeray.actors.client_load import ClientPolicy
from moeray.actors.comm import WorldSpec
from moeray.actors.engine import EngineConfig
from moeray.actors.expert_group_actor import ExpertGroupActor
from moeray.actors.placement import PlacementPlan, PlanError, check_plan
from moeray.actors.router_actor import RouterActor
from moeray.actors.sequence import SamplingParams
from moeray.autoscaler.planner import PlanLimits, Topology
from moeray.autoscaler.reshape import drain, drain_candidate, grow, lose_group, remove_group
from moeray.autoscaler.scaling import resource_shortfall
from moeray.cluster.resume import RouterOutputs, resumable_stream
from moeray.models.loader import load_config


class DeploymentError(RuntimeError):
    """The cluster could not be brought up; the message says which part and why."""


@dataclass(frozen=True)
class ClusterConfig:
    model_path: str
    num_groups: int = 2
    redundant_slots: int = 0
    dtype: str = "float32"
    plan: PlacementPlan | None = None  # default: PlacementPlan.default(...)
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_queued_requests: int = 256  # waiting requests beyond which the router refuses new ones
    world_timeout_s: float = 30.0  # a collective that waits longer than this fails the step
    start_timeout_s: float = 300.0  # loading weights on every actor (and nodes the autoscaler adds)
    group_resources: dict[str, float] = field(default_factory=dict)  # each group asks for exactly these; {}: automatic
    client_policy: ClientPolicy = field(default_factory=ClientPolicy)  # saturation flags, per-client token rate


class Deployment:
    """A running router + expert groups. `generate` streams one request's outputs."""

    def __init__(self, router, groups: list, plan: PlacementPlan, config: ClusterConfig, model_path: str,
                 threads: int, group_options: dict, spec: WorldSpec | None = None):
        self.router, self.groups, self.initial_plan, self.spec = router, groups, plan, spec
        self.config, self.model_path, self.threads, self.group_options = config, model_path, threads, group_options  # to start more groups
        self.target_groups = len(groups)  # the pool size asked for (by deploy or scale_to): what `watch` heals to
        self._lock = threading.RLock()  # one resize or recovery at a time
        self._loop: asyncio.AbstractEventLoop | None = None  # `generate`'s, see _event_loop
        self._loop_lock = threading.Lock()
        self.outputs: RouterOutputs | None = None
        self.recoveries: dict[str, dict] = {kind: {"count": 0, "last_s": None} for kind in ("expert_group", "router")}

    @property
    def group_demand(self) -> dict[str, float] | None:
        """The Ray resources one more group needs, when fixed (a GPU, or its weights' memory); None
        with custom `group_resources`, which an autoscaling cluster may add nodes for."""
        if self.config.group_resources:
            return None
        options = self.group_options
        return {"GPU": options["num_gpus"]} if options.get("num_gpus") else {"memory": options["memory"]}

    def generate(self, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> Iterator[dict]:
        """One request's items, the way the ingress gets them: through this deployment's one
        subscription to the router (`cluster.resume`), resumed if the router dies. One coroutine
        on the subscription's loop puts them in a queue that this thread reads, so an item costs one
        wake-up of this thread; a coroutine scheduled across threads per item made the client side
        (64 streams) take a third of a 2-core machine from the cluster it measures."""
        loop = self._event_loop()
        request_id = f"deployment-{uuid.uuid4().hex}"
        box: queue.Queue = queue.Queue()  # items, then None at the end, or the request's error
        pump = asyncio.run_coroutine_threadsafe(
            _pump(resumable_stream(self.outputs, list(prompt_ids), params, request_id, None), box), loop)
        finished = False
        try:
            while not finished and (item := box.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                finished = item["finished"]
                yield item
        finally:
            if loop.is_running():
                pump.cancel()  # closes the stream (its finally runs on the loop); no-op once it ended
            if not finished:  # the caller stopped reading (or it failed): free it on the router
                self.router.abort.remote(request_id)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop `generate`'s subscription runs on, in a thread of its own (started on first use)."""
        with self._loop_lock:  # not self._lock: that one is held through whole resizes
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="deployment-outputs", daemon=True).start()
                self.outputs = RouterOutputs(self.router, name=f"deployment-{uuid.uuid4().hex[:12]}")
            return self._loop

    def set_plan(self, plan: PlacementPlan) -> int:
        return ray.get(self.router.set_plan.remote(plan.to_json()))

    def plan(self) -> PlacementPlan:
        return PlacementPlan.from_json(ray.get(self.router.plan_json.remote()), self.initial_plan.num_experts)

    def group_nodes(self) -> list[int]:
        """Per group, the index of its node (0, 1, ... in order of first appearance)."""
        return ray.get(self.router.group_nodes.remote())

    def stats(self) -> dict:
        return {"router": ray.get(self.router.stats.remote()), "groups": ray.get([g.stats.remote() for g in self.groups])}

    def scale_to(self, num_groups: int, log=lambda message: None, timeout_s: float = 300.0) -> PlacementPlan:
        """Grow or shrink the expert pool to `num_groups` groups while serving goes on.

        Out: the new groups start (asking Ray for their resources, so an autoscaling cluster adds
        nodes), load the experts `reshape.grow` gives them — the old groups keep every slot — and
        the world re-forms at a step boundary with the wider plan active from its first step.
        In, one group at a time: `reshape.drain` moves its sole copies elsewhere (a normal staged
        migration, serving on), then the world re-forms without it (`remove_group` renumbers the
        groups after it) and its actor goes, releasing its resources. Requests in flight wait at
        most one re-formation; none is dropped."""
        if num_groups < 1:
            raise ValueError(f"expert_groups={num_groups} must be at least 1")
        with self._lock:
            self._sync_groups()
            return self._scale_to(num_groups, log, timeout_s)

    def _scale_to(self, num_groups: int, log, timeout_s: float) -> PlacementPlan:
        plan = self.plan()
        if num_groups > plan.num_experts:
            raise ValueError(f"expert_groups={num_groups} is more than the {plan.num_experts} experts per layer")
        self.target_groups = num_groups
        if num_groups > plan.num_groups:
            return self._grow(plan, num_groups, log, timeout_s)
        while plan.num_groups > num_groups:
            plan = self._shrink(plan, log, timeout_s)
        return plan

    def recover(self, log=lambda message: None) -> bool:
        """If the router waits on a broken world (a group died), re-form it without the dead groups:
        their experts are served from replicas elsewhere, or loaded into survivors' free or surplus
        slots (`reshape.lose_group`), and the router replays the step that failed. -> whether it did."""
        with self._lock:
            self._sync_groups()
            if ray.get(self.router.stats.remote())["broken"] is None:
                return False
            return self._recover(log)

    def revive_router(self, log=lambda message: None) -> bool:
        """If Ray restarted the router after its process died (it is created with `max_restarts=-1`),
        bring the new one into service: load it with the plan the groups hold (replacing any group
        that died too), form a new world with them and start its step loop. The requests it held are
        resubmitted by the ingress (`cluster.resume`). -> whether it did."""
        with self._lock:
            return self.router_state() in ("new", "loaded") and self._revive_router(log)  # loaded: a revival failed midway

    def router_state(self) -> str | None:
        """`RouterActor.state()`, or None while its process is gone and Ray starts the next one."""
        try:
            return ray.get(self.router.state.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            return None

    def _revive_router(self, log) -> bool:
        started = time.monotonic()
        log("the router died and Ray restarted it: reloading it and re-forming the world")
        groups, dead = list(self.groups), [g for g, actor in enumerate(self.groups) if not _alive(actor)]
        if len(dead) == len(groups):
            raise DeploymentError("the router died and so did every expert group; nothing to re-form around")
        plan_json = ray.get(groups[next(g for g in range(len(groups)) if g not in dead)].plan_json.remote())
        for group in dead:  # the same plan on a fresh process: it loads exactly the dead group's slots
            ray.kill(groups[group])
            groups[group] = self._start_group(group, plan_json)
        _wait_loaded([("router (restarted)", self.router)] + [(f"expert group {g} (replacement)", groups[g]) for g in dead],
                     self.config.start_timeout_s, log, load_args={"router (restarted)": (plan_json,)})
        host, port = ray.get(self.router.rendezvous.remote())  # the new process's own store
        spec = replace(self.spec, store_host=host, store_port=port, generation=self.spec.generation + 1,
                       world_size=len(groups) + 1)
        _start_serving(self.router, groups, spec)
        self.groups, self.spec = groups, spec
        self._recovered("router", started)
        log(f"router back in service {time.monotonic() - started:.1f} s after its restart was noticed"
            + (f" (replaced expert group(s) {dead})" if dead else ""))
        return True

    def _start_group(self, group: int, plan_json: str):
        """A new expert-group actor for `group` of that plan (it loads its slots in `load`)."""
        return ExpertGroupActor.options(**self.group_options).remote(self.model_path, group, plan_json,
                                                                     self.config.dtype, self.threads)

    def _recovered(self, kind: str, started: float) -> None:
        self.recoveries[kind] = {"count": self.recoveries[kind]["count"] + 1, "last_s": time.monotonic() - started}

    def _recover(self, log) -> bool:
        started = time.monotonic()
        dead = [g for g, actor in enumerate(self.groups) if not _alive(actor)]
        if not dead:
            log("the expert world broke but every group answers; leaving it to the router's timeout")
            return False
        for group in dead:
            ray.kill(self.groups[group])  # frees its resources for a replacement
        plan = self.plan()
        try:  # the survivors take over: no new process, only the lost sole copies to load
            survivors_plan, reloads = self._without(plan, dead)
        except PlanError as err:  # no room for them: replace the dead groups instead
            log(f"survivors cannot hold the lost experts ({err}); starting replacement group(s) {dead}")
            groups = list(self.groups)
            for group in dead:
                groups[group] = self._start_group(group, plan.to_json())
            _wait_loaded([(f"expert group {g} (replacement)", groups[g]) for g in dead], self.config.start_timeout_s, log)
            self._reform(plan, groups, load_missing=False)
            how = f"replaced group(s) {dead}"
        else:
            self._reform(survivors_plan, [a for g, a in enumerate(self.groups) if g not in dead], load_missing=True)
            how = f"survivors took over, {reloads} expert copies reloaded, plan v{survivors_plan.version}"
        self._recovered("expert_group", started)
        log(f"recovered from the loss of expert group(s) {dead} in {time.monotonic() - started:.1f} s: {how}")
        return True

    def _without(self, plan: PlacementPlan, dead: list[int]) -> tuple[PlacementPlan, int]:
        """The plan served by the survivors alone (`reshape.lose_group`), and the copies they must load."""
        load, reloads = self._load(plan), 0
        for group in sorted(dead, reverse=True):  # highest first: the lower indices stay valid
            plan, moves, _lost = lose_group(plan, group, load, _reshape_limits(plan, plan.num_groups),
                                            Topology(tuple(range(plan.num_groups))))
            reloads += len(moves)
        return plan, reloads

    def watch(self, log=lambda message: None, interval_s: float = 0.5) -> threading.Event:
        """Bring a restarted router back, recover from lost groups, then heal the pool back to
        `target_groups`, on a background thread until the returned event is set."""
        stop = threading.Event()

        def loop():
            while not stop.wait(interval_s):
                try:
                    if self.router_state() != "serving":  # restarting (None), or a new one to bring back
                        self.revive_router(log)
                        continue
                    if self.recover(log) and len(self.groups) < self.target_groups:
                        log(f"healing the pool: back to {self.target_groups} expert groups")
                        self.scale_to(self.target_groups, log)
                except Exception as err:  # keep watching; the next look may succeed
                    log(f"recovery failed: {type(err).__name__}: {err}")

        threading.Thread(target=loop, name="deployment-watch", daemon=True).start()
        return stop

    def _sync_groups(self) -> None:
        """The router's list is the truth: recoveries change it behind our back (a router that Ray
        has just restarted knows none: ours stays)."""
        groups = ray.get(self.router.group_handles.remote(), timeout=30)
        if groups is not None:
            self.groups = groups

    def _grow(self, plan: PlacementPlan, num_groups: int, log, timeout_s: float) -> PlacementPlan:
        if self.group_demand and (short := resource_shortfall(self.group_demand, num_groups - plan.num_groups,
                                                              ray.available_resources())):
            raise DeploymentError(f"cannot scale to {num_groups} expert groups: {short}")
        new_plan, _ = grow(plan, num_groups - plan.num_groups, self._load(plan), _reshape_limits(plan, num_groups),
                           Topology(tuple(range(num_groups))))
        log(f"scaling out: starting expert groups {plan.num_groups}..{num_groups - 1}")
        new = [self._start_group(g, new_plan.to_json()) for g in range(plan.num_groups, num_groups)]
        try:
            _wait_loaded([(f"expert group {g}", a) for g, a in enumerate(new, plan.num_groups)], timeout_s, log)
            self._reform(new_plan, self.groups + new)
        except BaseException:
            for actor in new:
                ray.kill(actor)
            raise
        log(f"scaled out to {num_groups} expert groups (plan v{new_plan.version})")
        return new_plan

    def _shrink(self, plan: PlacementPlan, log, timeout_s: float) -> PlacementPlan:
        load = self._load(plan)
        group = drain_candidate(plan, load)
        drained, moves = drain(plan, group, load, _reshape_limits(plan, plan.num_groups), Topology(tuple(range(plan.num_groups))))
        log(f"scaling in: moving {sum(m.new_expert >= 0 for m in moves)} expert copies off group {group}")
        self.set_plan(drained)
        self._wait_active(drained.version, timeout_s)
        smaller = remove_group(drained, group)
        leaving = self.groups[group]
        self._reform(smaller, [a for g, a in enumerate(self.groups) if g != group])
        ray.kill(leaving)
        log(f"scaled in to {smaller.num_groups} expert groups (plan v{smaller.version})")
        return smaller

    def _reform(self, plan: PlacementPlan, groups: list, load_missing: bool = False) -> None:
        spec = replace(self.spec, generation=self.spec.generation + 1, world_size=len(groups) + 1)
        refs = [self.router.reform.remote(spec, plan.to_json(), groups)]
        refs += [a.join.remote(spec, g + 1, plan.to_json(), load_missing) for g, a in enumerate(groups)]
        ray.get(refs, timeout=spec.timeout_s * 2)
        ray.get([a.serve.remote() for a in groups])
        self.groups, self.spec = groups, spec

    def _load(self, plan: PlacementPlan):
        """The router's load window [L, E] (all kept), to place experts by."""
        window = ray.get(self.router.load_snapshot.remote(None))["window"]
        return torch.tensor(window, dtype=torch.float64)

    def _wait_active(self, version: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (stats := ray.get(self.router.stats.remote()))["plan_version"] < version:
            if stats["staging_error"] and f"v{version}" in stats["staging_error"]:
                raise DeploymentError(stats["staging_error"])
            if time.monotonic() > deadline:
                raise DeploymentError(f"plan v{version} was not active within {timeout_s:.0f} s")
            time.sleep(0.05)

    def reform(self) -> None:
        """Re-form the world (next generation) at a step boundary, with the same members."""
        self.spec = replace(self.spec, generation=self.spec.generation + 1)
        refs = [self.router.reform.remote(self.spec)] + [g.join.remote(self.spec, i + 1) for i, g in enumerate(self.groups)]
        ray.get(refs, timeout=self.spec.timeout_s * 2)
        ray.get([g.serve.remote() for g in self.groups])

    def shutdown(self) -> None:
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(_cancel_tasks(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        try:
            self._sync_groups()
        except ray.exceptions.RayError:
            pass  # the router is gone: kill the groups we know
        try:
            ray.get(self.router.shutdown.remote(), timeout=60)
        finally:
            for actor in [self.router, *self.groups]:
                ray.kill(actor)


def deploy(config: ClusterConfig, log=lambda message: None) -> Deployment:
    """Start the actors (Ray must be initialised), form the world, start serving."""
    model_config, _ = load_config(config.model_path)
    num_moe_layers = len(model_config.moe_layer_ids)
    plan = config.plan or PlacementPlan.default(num_moe_layers, model_config.num_experts, config.num_groups,
                                                config.redundant_slots)
    check_plan(plan, model_config.num_experts, num_moe_layers)
    if plan.num_groups != config.num_groups:
        raise DeploymentError(f"the plan has {plan.num_groups} groups but {config.num_groups} expert groups were asked for")
    path = str(Path(config.model_path).resolve())
    group_bytes = _group_weight_bytes(model_config, plan, config.dtype)
    if config.group_resources:
        group_opts, router_opts, backend = _requested_resources(config.group_resources), {"num_cpus": 0}, "gloo"
        missing = _missing_resources(config.group_resources, config.num_groups, ray.cluster_resources())
        if missing:
            log(f"waiting up to {config.start_timeout_s:.0f} s for the cluster to add {missing} "
                f"({config.num_groups} expert groups x {config.group_resources})")
    else:
        use_gpus = ray.cluster_resources().get("GPU", 0) > 0
        group_opts, router_opts, backend = _resources(config.num_groups, group_bytes, use_gpus)
    threads = max(1, (os.cpu_count() or 1) // (config.num_groups + 1))
    groups = [ExpertGroupActor.options(**group_opts).remote(path, g, plan.to_json(), config.dtype, threads)
              for g in range(config.num_groups)]
    # max_restarts: Ray restarts a router that dies, and `revive_router` brings the new one into service
    router = RouterActor.options(**router_opts, max_restarts=-1).remote(
        path, plan.to_json(), config.dtype, config.engine, threads, config.max_queued_requests, config.client_policy)
    deployment = Deployment(router, groups, plan, config, path, threads, group_opts)
    try:
        _wait_loaded([("router", router)] + [(f"expert group {g}", a) for g, a in enumerate(groups)],
                     config.start_timeout_s, log)
        host, port = ray.get(router.rendezvous.remote())
        spec = WorldSpec(host, port, config.num_groups + 1, backend=backend, timeout_s=config.world_timeout_s)
        deployment.spec = spec
        _start_serving(router, groups, spec)
    except BaseException:
        for actor in [router, *groups]:
            ray.kill(actor)
        raise
    return deployment


def _start_serving(router, groups: list, spec: WorldSpec) -> None:
    """Form a first world of a router not yet serving and `groups`, and start its step loop."""
    ray.get([router.join.remote(spec)] + [a.join.remote(spec, g + 1) for g, a in enumerate(groups)],
            timeout=spec.timeout_s * 2)
    ray.get([a.serve.remote() for a in groups])
    ray.get(router.start.remote(groups))


async def _cancel_tasks() -> None:
    """Cancel every other task of this loop (the subscription reader) and let them finish."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(stream, box: queue.Queue) -> None:
    """Move a request's items from its stream into `box` for `Deployment.generate`'s thread: each
    item, then None; or the request's error."""
    try:
        async for item in stream:
            box.put(item)
        box.put(None)
    except Exception as err:  # (cancellation, a BaseException, just ends the pump)
        box.put(err)


def _alive(actor) -> bool:
    try:
        ray.get(actor.node_id.remote(), timeout=10)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def _reshape_limits(plan: PlacementPlan, num_groups: int) -> PlanLimits:
    """Room to fill every new slot, and copies up to one per group."""
    return PlanLimits(max_moves=num_groups * plan.slots_per_group * plan.num_layers, max_bytes=None,
                      bytes_per_expert=1, max_replicas_per_expert=num_groups, target_imbalance=1.0)


def _resources(num_groups: int, group_bytes: int, use_gpus: bool) -> tuple[dict, dict, str]:
    """Actor options for groups and router, and the world backend; fails early and by name."""
    available = ray.cluster_resources()
    if use_gpus:
        if available.get("GPU", 0) < num_groups:
            raise DeploymentError(f"{num_groups} expert groups need {num_groups} GPUs (resource 'GPU'); "
                                  f"the cluster has {available.get('GPU', 0):g}")
        # The router's dense part runs on the CPU, so every message starts and ends in host memory:
        # gloo carries it, and each group moves its rows to its GPU and the results back. (NCCL
        # would need the router on a GPU: with its model on the CPU its messages could not even be
        # gathered into GPU buffers, so it is not offered until the router runs there.)
        return {"num_gpus": 1, "num_cpus": 0}, {"num_cpus": 0}, "gloo"
    need = group_bytes * num_groups
    if available.get("memory", 0) < need:
        raise DeploymentError(f"{num_groups} expert groups need {need / 2**30:.2f} GiB of resource 'memory' for "
                              f"their weights; the cluster has {available.get('memory', 0) / 2**30:.2f} GiB")
    return {"num_cpus": 0, "memory": group_bytes}, {"num_cpus": 0}, "gloo"


def expert_bytes(model_config, dtype: str) -> int:
    """Weight bytes of one expert (gate, up and down projections): what moving one costs."""
    itemsize = 2 if dtype == "bfloat16" else 4
    return 3 * model_config.hidden_size * model_config.moe_intermediate_size * itemsize


def _requested_resources(group_resources: dict[str, float]) -> dict:
    """Actor options asking for exactly `group_resources`; CPU, GPU and memory go by Ray's option names."""
    custom = dict(group_resources)
    options = {"num_cpus": custom.pop("CPU", 0), "num_gpus": custom.pop("GPU", 0)}
    if "memory" in custom:
        options["memory"] = custom.pop("memory")
    return {**options, "resources": custom} if custom else options


def _missing_resources(group_resources: dict[str, float], num_groups: int, available: dict) -> dict[str, float]:
    """What `num_groups` groups need beyond what the cluster has now (an autoscaler may add it)."""
    need = {name: amount * num_groups - available.get(name, 0) for name, amount in group_resources.items()}
    return {name: short for name, short in need.items() if short > 0}


def _group_weight_bytes(model_config, plan: PlacementPlan, dtype: str) -> int:
    return max(1, plan.num_layers * plan.slots_per_group * expert_bytes(model_config, dtype))


def _wait_loaded(actors: list[tuple[str, "ray.actor.ActorHandle"]], timeout_s: float, log,
                 load_args: dict[str, tuple] | None = None) -> None:
    """Have every actor load its weights (`load(*load_args[name])`), logging progress as it changes;
    name the one that failed or is stuck."""
    deadline = time.monotonic() + timeout_s
    loads = {name: actor.load.remote(*(load_args or {}).get(name, ())) for name, actor in actors}
    shown = f"loading weights: {', '.join(name for name, _ in actors)}"
    log(shown)
    while loads:
        done, _ = ray.wait(list(loads.values()), num_returns=len(loads), timeout=1.0)
        for name in [n for n, ref in loads.items() if ref in done]:
            try:
                ray.get(loads.pop(name))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                raise DeploymentError(f"{name} failed to start: {_cause(err)}") from None
        if loads and time.monotonic() > deadline:
            raise DeploymentError(f"{', '.join(loads)} did not start within {timeout_s:.0f} s (still loading "
                                  "weights, or waiting for resources the cluster does not have)")
        if loads and (line := _progress_line(actors, loads)) != shown:
            log(line)
            shown = line


def _progress_line(actors: list[tuple[str, "ray.actor.ActorHandle"]], loading: dict) -> str:
    """'loading weights: router 3/4, expert group 0 12/20, expert group 1 done' (asks all at once, waits <= 1 s)."""
    asks = {name: actor.progress.remote() for name, actor in actors if name in loading}
    ready, _ = ray.wait(list(asks.values()), num_returns=len(asks), timeout=1.0)
    parts = []
    for name, _actor in actors:
        if name not in asks:
            parts.append(f"{name} done")
            continue
        done, total = ray.get(asks[name]) if asks[name] in ready else (0, 0)
        parts.append(f"{name} {done}/{total}" if total else f"{name} starting")
    return "loading weights: " + ", ".join(parts)


def _cause(err: Exception) -> str:
    """The last line of an actor's init traceback: the error the user can act on."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if "Error:" in line and not line.startswith("ray.")]
    return causes[-1] if causes else (lines[-1] if lines else repr(err))
