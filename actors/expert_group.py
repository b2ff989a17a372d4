"""`ExpertGroup`: one rank of the expert world, holding the weights of its S slots per MoE layer.

It never acts on its own between steps: `serve` reads the router's step header and follows it.
Its slots' weights live on its `device` (the actor's GPU when it has one) and so does its expert
FFN; the checkpoint is read and staged on the host, and copied in when a slot takes an expert.
Per MoE layer of a step it receives one message from the router (per-slot counts, then the
rows sorted by slot), runs the grouped SwiGLU over its slots, and sends the results back in the
same order. GPT-OSS's experts also hold biases per slot (`ExpertBiases`), loaded and moved with
their weights. Placement changes come in two halves: `stage(plan)` loads the weights of the slots
that change into staging memory (on another thread) while steps go on; the header
`ACTIVATE v` copies them into place at a step boundary, on every rank at once.
"""

from pathlib import Path
from typing import Callable

import torch

from moeray.actors.comm import Command, World
from moeray.actors.dispatch import head_bytes, max_rows_per_group, message_bytes, unpack
from moeray.actors.placement import PlacementPlan, check_plan
from moeray.kernels.moe import ExpertBiases, expert_ffn
from moeray.models.checkpoint import CheckpointReader, load_expert_biases, load_experts
from moeray.models.loader import load_config, moe_prefix


class ExpertGroup:
    def __init__(self, model_path: str | Path, group: int, plan: PlacementPlan, dtype: torch.dtype = torch.float32,
                 progress: Callable[[int, int], None] | None = None, device: torch.device | str = "cpu"):
        self.config, family = load_config(model_path)
        self.group, self.dtype, self.device = group, dtype, torch.device(device)  # where the slots' weights live
        self.reader = CheckpointReader(model_path, self.config.fp8)
        self.prefixes = [moe_prefix(family, self.reader, layer) for layer in self.config.moe_layer_ids]
        check_plan(plan, self.config.num_experts, len(self.prefixes))
        c, slots = self.config, plan.slots_per_group
        self.w13 = [torch.zeros(slots, 2 * c.moe_intermediate_size, c.hidden_size, dtype=dtype, device=self.device)
                    for _ in self.prefixes]  # L x [S, 2I, H]
        self.w2 = [torch.zeros(slots, c.hidden_size, c.moe_intermediate_size, dtype=dtype, device=self.device)
                   for _ in self.prefixes]  # L x [S, H, I]
        self.biases = [ExpertBiases(torch.zeros(slots, 2 * c.moe_intermediate_size, dtype=dtype, device=self.device),
                                    torch.zeros(slots, c.hidden_size, dtype=dtype, device=self.device))
                       if c.expert_bias else None for _ in self.prefixes]  # L x ([S, 2I], [S, H]) or None
        slots_here = [(l, s, int(e)) for l in range(plan.num_layers)
                      for s, e in enumerate(plan.physical_to_logical[l, group]) if e >= 0]
        for done, (layer, slot, weights) in enumerate(self._load(slots_here), 1):
            self._put(layer, slot, weights)
            if progress:
                progress(done, len(slots_here))
        self.plan = plan
        self._staged: tuple[PlacementPlan, list] | None = None  # (plan, [(layer, slot, weights)])
        self.tokens_per_slot = torch.zeros(plan.num_layers, slots, dtype=torch.long)  # [L, S] since start
        self._inbox = torch.empty(0, dtype=torch.uint8)  # see `inbox`

    @property
    def staged_version(self) -> int | None:
        staged = self._staged
        return staged[0].version if staged else None

    def stage(self, plan: PlacementPlan) -> None:
        """Load the slots `plan` changes in this group into staging memory.

        Runs on a caller's thread beside `serve` (steps go on meanwhile); only the finished
        result is published, in one assignment, for `activate` to pick up."""
        if plan.physical_to_logical.shape != self.plan.physical_to_logical.shape:
            raise ValueError(f"group {self.group}: plan v{plan.version} has shape "
                             f"{tuple(plan.physical_to_logical.shape)}, active is {tuple(self.plan.physical_to_logical.shape)}")
        self._staged = (plan, list(self._load(plan.changed_slots(self.plan).get(self.group, []))))

    def adopt(self, plan: PlacementPlan, group: int) -> None:
        """Take `plan` as group `group` (between worlds: the pool grew or shrank). Each of this group's
        slots must keep its expert or be emptied — a re-formation loads no weights (migrations do
        that before it); a slot emptied here is simply no longer routed to."""
        if plan.slots_per_group != self.plan.slots_per_group or plan.num_layers != self.plan.num_layers:
            raise ValueError(f"group {self.group}: plan v{plan.version} has {plan.num_layers} layers x "
                             f"{plan.slots_per_group} slots, this group {self.plan.num_layers} x {self.plan.slots_per_group}")
        mine, theirs = self.plan.physical_to_logical[:, self.group], plan.physical_to_logical[:, group]
        if ((theirs != mine) & (theirs >= 0)).any():
            raise ValueError(f"group {self.group}: plan v{plan.version} gives group {group} other experts than "
                             f"this group holds; stage a migration first")
        self.plan, self.group, self._staged = plan, group, None

    def rebuild(self, plan: PlacementPlan, group: int) -> list[tuple[int, int, int]]:
        """Take `plan` as group `group`, loading from the checkpoint every slot whose expert changed
        (failure recovery: the experts of a lost group move into survivors' slots). Returns the
        (layer, slot, expert) it loaded."""
        if plan.slots_per_group != self.plan.slots_per_group or plan.num_layers != self.plan.num_layers:
            raise ValueError(f"group {self.group}: plan v{plan.version} has another shape per group")
        mine, theirs = self.plan.physical_to_logical[:, self.group], plan.physical_to_logical[:, group]
        changed = [(layer, slot, int(theirs[layer, slot]))
                   for layer, slot in ((theirs != mine) & (theirs >= 0)).nonzero().tolist()]
        for layer, slot, weights in self._load(changed):
            self._put(layer, slot, weights)
        self.plan, self.group, self._staged = plan, group, None
        return changed

    def activate(self, version: int) -> None:
        """Copy staged weights into their slots (between steps) and switch to plan `version`."""
        if self._staged is None or self._staged[0].version != version:
            raise RuntimeError(f"group {self.group}: asked to activate v{version}, staged v{self.staged_version}")
        plan, staged = self._staged
        for layer, slot, weights in staged:
            self._put(layer, slot, weights)
        self.plan, self._staged = plan, None

    def serve(self, world: World) -> Command:
        """Follow step headers until REFORM or STOP; returns that command."""
        while True:
            command, _step, version, num_tokens = world.recv_header().tolist()
            command = Command(command)
            if command in (Command.REFORM, Command.STOP):
                return command
            if command == Command.IDLE:
                if version != self.plan.version:  # the router switched plans while idle
                    self.activate(version)
                continue
            if command == Command.ACTIVATE:
                self.activate(version)
            if version != self.plan.version:
                raise RuntimeError(f"group {self.group}: step runs plan v{version}, active is v{self.plan.version}")
            inbox = self.inbox(num_tokens, world.device)
            for layer in range(self.plan.num_layers):
                self.run_layer(world, layer, inbox)

    def inbox(self, num_tokens: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """A receive buffer (uint8) that holds this group's message of any layer of a step of `num_tokens`
        tokens; reused from step to step, grown when a step is bigger than any before."""
        slots = self.plan.slots_per_group
        size = message_bytes(slots, max_rows_per_group(num_tokens, self.config.top_k, slots),
                             self.config.hidden_size, self.dtype)
        if self._inbox.numel() < size or self._inbox.device != device:
            self._inbox = torch.empty(size, dtype=torch.uint8, device=device)
        return self._inbox

    def run_layer(self, world: World, layer: int, inbox: torch.Tensor) -> None:
        """One MoE layer: the router's message in (per-slot counts, rows sorted by slot), expert FFN, rows back."""
        slots, hidden = self.plan.slots_per_group, self.config.hidden_size
        world.recv_message(inbox, 0, head_bytes(slots),
                           lambda head: message_bytes(slots, int(head.view(torch.long).sum()), hidden, self.dtype))
        counts, rows = unpack(inbox, slots, hidden, self.dtype)  # [S], [n, H] (views into the inbox)
        counts = counts.cpu()
        self.tokens_per_slot[layer] += counts
        if rows.shape[0]:
            world.send(self.compute(layer, rows, counts.tolist()), 0).wait()

    def compute(self, layer: int, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The grouped SwiGLU of MoE layer `layer` on this group's device: rows [n, H] sorted by slot,
        counts[s] of them for slot s -> [n, H] on that device (World.send moves it if the world's differs)."""
        return expert_ffn(rows.to(self.device), counts, self.w13[layer], self.w2[layer], self.biases[layer],
                          self.config.expert_activation)

    def _put(self, layer: int, slot: int, weights: tuple[torch.Tensor, ...]) -> None:
        """Copy one expert's tensors (see `_load`) into slot `slot` of MoE layer `layer`."""
        biases = self.biases[layer]
        stacks = (self.w13[layer], self.w2[layer], *((biases.b13, biases.b2) if biases is not None else ()))
        for stack, tensor in zip(stacks, weights, strict=True):
            stack[slot].copy_(tensor)

    def _load(self, slots: list[tuple[int, int, int]]):
        """(layer, slot, logical expert) -> yields (layer, slot, weights) from the checkpoint, weights being
        (w13 [2I, H], w2 [H, I]) and, with expert biases, (b13 [2I], b2 [H]) after them."""
        c = self.config
        for layer, slot, expert in slots:
            sizes = (c.hidden_size, c.moe_intermediate_size, c.num_experts, self.dtype)
            weights = load_experts(self.reader, self.prefixes[layer], [expert], *sizes, c.expert_layout)
            if c.expert_bias:
                weights += load_expert_biases(self.reader, self.prefixes[layer], [expert], *sizes)
            yield layer, slot, tuple(t[0] for t in weights)
