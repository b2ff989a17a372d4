"""`Router`: the dense half of the model plus the batcher, dispatching every MoE layer to expert groups.

It is the in-process `Engine` (batcher, paged KV cache, runner, sampler: reused, not copied)
whose MoE blocks hold `RemoteExperts` instead of local weights. Each step it first sends
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
from moeray.actors.dispatch import head_bytes, max_rows_per_group, pack, route
from moeray.actors.engine import Engine, EngineConfig, RequestOutput
from moeray.actors.client_load import ClientLoad
from moeray.actors.load import LoadTracker
from moeray.actors.placement import PlacementPlan, check_plan
from moeray.kernels.moe import PermuteHandle, sort_pairs, unpermute
from moeray.models.loader import load_config, load_model
from moeray.models.tokenizer import Tokenizer


ANONYMOUS = "anonymous"  # the client of a request that names none


class ExpertLink:
    """The router's end of the expert world: the active plan and the per-layer exchanges."""

    def __init__(self, plan: PlacementPlan):
        self.plan = plan
        self.world: World | None = None
        self.num_tokens = 0  # tokens of the running step (its header's arg): bounds each group's message
        self.tracker = LoadTracker(plan.num_layers, plan.num_experts)
        self.client_load = ClientLoad(plan.num_layers, plan.num_experts)
        self._buffers: dict = {}  # see buffer
        self.header: Tensor | None = None  # the running step's header until its first layer sends it

    def send(self, x: Tensor, handle: PermuteHandle, counts: Tensor) -> tuple:
        """Send group g (rank g + 1) its message (counts [S] + x's rows of its pairs) as soon as it is
        gathered, then post the receive of its results; returns at once. In that order because NCCL
        runs a pair's sends and receives in order on one stream: a receive posted before the pair's
        send would wait for results that need the send first (gloo would not mind either way).
        x [T, H]; counts [G, S]. -> pending, for `receive`."""
        world, slots = self.world, counts.shape[1]
        rows_per_group = counts.sum(1).tolist()  # [G]
        assert max(rows_per_group) <= max_rows_per_group(self.num_tokens, handle.top_k, slots), \
            f"a group's rows {rows_per_group} overflow the buffer sized for {self.num_tokens} tokens"
        results = self.buffer("results", sum(rows_per_group) * x.shape[1], x.dtype, world.device).view(
            -1, x.shape[1])  # [T*K, H]
        works, messages, row = [], [], 0  # messages: kept referenced until their sends are done
        if self.header is not None:  # the step's first layer: its header goes first
            works += world.send_header(self.header)
            messages.append(self.header)
            self.header = None
        alloc = lambda group, nbytes: self.buffer(("message", group), nbytes, torch.uint8, world.device)  # noqa: E731
        for group, message in enumerate(pack(x, handle, counts, alloc)):
            works += world.send_message(message, group + 1, head_bytes(slots))
            messages.append(message)
            if n := rows_per_group[group]:
                works.append(world.recv(results[row:row + n], group + 1))
            row += n
        return works, messages, results

    def buffer(self, key, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The first `numel` elements of a buffer kept from layer to layer (grown, never shrunk).
        A layer's messages and results reuse the memory of the layer before, which `receive` and
        the combine are done with: fresh multi-MB tensors every layer cost their page faults
        (about as much as the copy into them at 8 MB)."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    @staticmethod
    def receive(pending: tuple) -> Tensor:
        """Wait for `send`'s messages to go and the results to come: [T*K, H], in sorted-pair order."""
        works, _messages, results = pending  # the messages stay referenced until their sends are done
        for work in works:
            work.wait()
        return results


class RemoteExperts(nn.Module):
    """Experts of one MoE layer, computed by the expert groups (router side)."""

    def __init__(self, moe_layer: int, link: ExpertLink):
        super().__init__()
        self.moe_layer, self.link = moe_layer, link

    def dispatch(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> tuple:
        """Route, sort and post the layer's messages; the caller works (shared experts) while they fly."""
        link, plan = self.link, self.link.plan
        link.tracker.add(self.moe_layer, topk_ids)
        link.client_load.add(self.moe_layer, topk_ids)
        handle = sort_pairs(route(topk_ids, plan, self.moe_layer), plan.num_groups * plan.slots_per_group)
        pending = link.send(x, handle, handle.counts.view(plan.num_groups, plan.slots_per_group))
        return pending, handle, topk_weights

    def combine(self, pending: tuple) -> Tensor:
        pending, handle, topk_weights = pending
        results = self.link.receive(pending).to(topk_weights.device)  # [T*K, H]
        scratch = lambda: self.link.buffer("unpermute", results.numel(), results.dtype,  # noqa: E731
                                           results.device).view(results.shape)  # only where the combine gathers
        return unpermute(results, handle, topk_weights, scratch)


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
        self.last_step_tokens = self.link.num_tokens = sum(batch.num_new)
        self._header(command, self.last_step_tokens)
        self.step_id += 1
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

    def _header(self, command: Command, num_tokens: int = 0) -> None:
        """The step header for every group. A RUN header goes with the step's first MoE layer, in the
        same round of sends as its messages (`ExpertLink.send`): the groups can do nothing before that
        message anyway, and the router no longer stops ~1 ms a step for it. A step that fails before
        its first layer sent nothing; its replay sends its own header. Any other header (ACTIVATE
        switches plans: it must reach the groups even if its step then fails) is sent and waited for at once."""
        header = torch.tensor([command, self.step_id, self.plan.version, num_tokens])
        if command == Command.RUN:
            self.link.header = header
            return
        self.link.header = None  # (a RUN header that a failed step never sent)
        for work in self.link.world.send_header(header):
            work.wait()
