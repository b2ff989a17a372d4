"""`Router`: the dense half of the model plus the batcher, dispatching every MoE layer to expert groups.

It is the in-process `Engine` (batcher, paged KV cache, runner, sampler: reused, not copied)
whose MoE blocks hold `RemoteExperts` instead of local weights. Each step it first broadcasts
the step header, so that every expert group runs the same step under the same plan version;
then, per MoE layer, `RemoteExperts` sends each group its rows (sorted by slot) and brings the
results back. A new plan, once every group has staged it, becomes active on the next step's
header (`ACTIVATE v`) — on all ranks at once, and never mid-step.
"""

import time
from pathlib import Path

import torch
from torch import Tensor, nn

from moeray.actors.comm import Command, World
from moeray.actors.dispatch import dispatch
from moeray.actors.engine import Engine, EngineConfig, RequestOutput
from moeray.actors.client_load import ClientLoad
from moeray.actors.load import LoadTracker
from moeray.actors.placement import PlacementPlan, check_plan
from moeray.kernels.moe import unpermute
from moeray.models.loader import load_config, load_model
from moeray.models.tokenizer import Tokenizer


ANONYMOUS = "anonymous"  # the client of a request that names none


class ExpertLink:
    """The router's end of the expert world: the active plan and the per-layer exchanges."""

    def __init__(self, plan: PlacementPlan):
        self.plan = plan
        self.world: World | None = None
        self.tracker = LoadTracker(plan.num_layers, plan.num_experts)
        self.client_load = ClientLoad(plan.num_layers, plan.num_experts)

    def send(self, rows: Tensor, counts: Tensor) -> None:
        """rows [n, H] sorted by (group, slot); counts [G, S]. Group g is rank g + 1."""
        world = self.world
        slots = counts.shape[1]
        to_ranks = torch.cat([torch.zeros(1, slots, dtype=torch.long), counts])  # [W, S]
        world.exchange_counts(to_ranks)
        world.exchange_rows(rows, to_ranks.sum(1).tolist(), [0] * world.size)

    def receive(self, counts: Tensor, like: Tensor) -> Tensor:
        """The groups' results, in the order `send` sent the rows: [n, H]."""
        splits = [0] + counts.sum(1).tolist()
        return self.world.exchange_rows(like.new_empty(0, like.shape[1]), [0] * self.world.size, splits)


class RemoteExperts(nn.Module):
    """Experts of one MoE layer, computed by the expert groups (router side)."""

    def __init__(self, moe_layer: int, link: ExpertLink):
        super().__init__()
        self.moe_layer, self.link = moe_layer, link

    def dispatch(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> tuple:
        self.link.tracker.add(self.moe_layer, topk_ids)
        self.link.client_load.add(self.moe_layer, topk_ids)
        rows, counts, handle = dispatch(x, topk_ids, self.link.plan, self.moe_layer)  # [T*K, H], [G, S]
        self.link.send(rows, counts)
        return rows, counts, handle, topk_weights

    def combine(self, pending: tuple) -> Tensor:
        rows, counts, handle, topk_weights = pending
        results = self.link.receive(counts, like=rows)  # [T*K, H]
        return unpermute(results, handle, topk_weights)


class Router:
    def __init__(self, model_path: str | Path, plan: PlacementPlan, dtype: torch.dtype = torch.float32,
                 engine_config: EngineConfig = EngineConfig(), progress=None):
        config, _ = load_config(model_path)
        check_plan(plan, config.num_experts, len(config.moe_layer_ids))
        self.link = ExpertLink(plan)
        moe_index = {layer: i for i, layer in enumerate(config.moe_layer_ids)}
        model = load_model(model_path, dtype, progress=progress,
                           make_experts=lambda layer: RemoteExperts(moe_index[layer], self.link))
        tokenizer = Tokenizer(model_path) if (Path(model_path) / "tokenizer.json").is_file() else None
        self.engine = Engine(model, tokenizer, engine_config)
        self.step_id = 0
        self.next_plan: PlacementPlan | None = None  # staged on every group; active from the next step
        self.last_step_tokens = 0
        self.scheduled_at: dict[int, float] = {}  # seq id -> when a step first ran it (queue time ends there)
        self.clients: dict[int, str] = {}  # seq id -> the client that sent it (load attribution)

    @property
    def plan(self) -> PlacementPlan:
        return self.link.plan

    @property
    def tracker(self) -> LoadTracker:
        return self.link.tracker

    def join(self, world: World) -> None:
        self.link.world = world

    def step(self) -> list[RequestOutput]:
        """schedule -> header -> model (with per-layer dispatch) -> sample -> outputs."""
        batch = self.engine.batcher.schedule()
        if not batch.seqs:
            return []
        return self.run(batch)

    def run(self, batch) -> list[RequestOutput]:
        """header -> model -> sample for a scheduled batch. If the world breaks mid-step this raises
        before anything is sampled or marked computed, so the same batch can run again (replay)
        on a re-formed world and give the same result."""
        self.link.tracker.begin_step()
        command = Command.RUN
        if self.next_plan is not None:
            self.link.plan, self.next_plan, command = self.next_plan, None, Command.ACTIVATE
        self._header(command)
        self.step_id += 1
        self.last_step_tokens = sum(batch.num_new)
        now = time.monotonic()
        for seq in batch.seqs:
            self.scheduled_at.setdefault(seq.seq_id, now)
        self.link.client_load.set_owners([self.clients.get(seq.seq_id, ANONYMOUS) for seq in batch.seqs], batch.num_new)
        outputs = self.engine.execute(batch)
        self.link.tracker.end_step()
        self.link.client_load.end_step()
        return outputs

    def leave(self) -> None:
        """Tell every group to leave (REFORM) and destroy this world; `join` a new one next.
        Nothing to do when the world already broke (a group died) and was destroyed."""
        if self.link.world is None:
            return
        self._header(Command.REFORM)
        self.link.world.destroy()
        self.link.world = None

    def idle(self) -> None:
        """A heartbeat between steps; it also switches to a staged plan, so an idle server activates too."""
        if self.next_plan is not None:
            self.link.plan, self.next_plan = self.next_plan, None
        self._header(Command.IDLE)

    def stop(self) -> None:
        self._header(Command.STOP)

    def _header(self, command: Command) -> None:
        self.link.world.broadcast_header(torch.tensor([command, self.step_id, self.plan.version, 0]))
