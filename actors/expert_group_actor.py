"""`ExpertGroupActor`: the Ray shell around `ExpertGroup` (one GPU each in production, CPU here),
on the GPU Ray assigned it, if any.

Threaded: `serve` runs the step loop on its own thread so that control calls (stage, stats)
are answered while steps go on. Per-layer traffic never goes through Ray calls.
"""

import os
import threading

import ray
import torch

from moeray.actors.comm import World, WorldSpec
from moeray.actors.expert_group import ExpertGroup
from moeray.actors.placement import PlacementPlan


def group_device() -> torch.device:
    """The GPU Ray gave this actor (`num_gpus=1` makes it the only visible one), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@ray.remote(max_concurrency=4)
class ExpertGroupActor:
    def __init__(self, model_path: str, group: int, plan_json: str, dtype: str, num_threads: int):
        torch.set_num_threads(num_threads)  # Ray sets OMP threads to the node's CPU count
        self._args = (model_path, group, PlacementPlan.from_json(plan_json), getattr(torch, dtype))
        self.loaded = (0, 0)  # (experts loaded, experts to load), for progress()
        self.group: ExpertGroup | None = None
        self.world: World | None = None
        self._loop: threading.Thread | None = None
        self.error: str | None = None

    def load(self) -> int:
        """Read this group's experts from the checkpoint (slow: the deployer polls `progress` meanwhile)."""
        self.group = ExpertGroup(*self._args, progress=lambda done, total: setattr(self, "loaded", (done, total)),
                                 device=group_device())
        return self.group.group

    def progress(self) -> tuple[int, int]:
        return self.loaded

    def pid(self) -> int:
        """This group's process id (chaos tests and `bench/chaos.py` kill it with SIGKILL)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this group runs on (the planner keeps replicas of one expert on different nodes)."""
        return ray.get_runtime_context().get_node_id()

    def join(self, spec: WorldSpec, rank: int, plan_json: str | None = None, load_missing: bool = False) -> None:
        """Join a world; when re-forming, first wait for the serve loop to leave the old one. With
        `plan_json` (the pool grew or shrank) take that plan as group rank - 1 before joining; with
        `load_missing` (a group was lost) load the experts it now holds that it did not."""
        if self._loop is not None:
            self._loop.join(timeout=spec.timeout_s)
            if self._loop.is_alive():
                raise RuntimeError(f"group {self.group.group} is still serving world {self.world.spec.generation}")
        if plan_json is not None:
            plan = PlacementPlan.from_json(plan_json, self.group.config.num_experts)
            (self.group.rebuild if load_missing else self.group.adopt)(plan, rank - 1)
        self.world = World(spec, rank)

    def serve(self) -> None:
        """Start following step headers on a background thread; returns at once."""
        def loop():
            try:
                self.group.serve(self.world)
            except Exception as err:  # reported through stats(); the router sees the broken world
                self.error = f"{type(err).__name__}: {err}"
            finally:
                self.world.destroy()

        self._loop = threading.Thread(target=loop, name=f"group{self.group.group}-serve", daemon=True)
        self._loop.start()

    def stage(self, plan_json: str) -> int:
        """Load the slots of a new plan that change here; returns its version once staged."""
        plan = PlacementPlan.from_json(plan_json, self.group.config.num_experts)
        self.group.stage(plan)
        return plan.version

    def plan_json(self) -> str:
        """The plan this group serves (a restarted router takes it from the groups)."""
        return self.group.plan.to_json()

    def stats(self) -> dict:
        return {"group": self.group.group, "plan_version": self.group.plan.version,
                "staged_version": self.group.staged_version, "error": self.error,
                "serving": self._loop is not None and self._loop.is_alive(),
                "tokens_per_slot": self.group.tokens_per_slot.tolist()}
