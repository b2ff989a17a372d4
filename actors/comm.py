"""The world: one torch.distributed process group of the router (rank 0) and expert groups (1..G).

Rendezvous is explicit: the router hosts a `TCPStore` on a port the OS picks (never a fixed
one) and hands `(host, port)` out through Ray; each world *generation* lives under its own
store prefix, so the world can be destroyed and re-formed with other members between steps.
gloo runs on CPU tensors, NCCL on each rank's GPU; `World.device` says which.

The step protocol's messages:
    header        rank 0 -> every group: [command, step, version, arg] (arg: tokens in a RUN step)
    per MoE layer, between the router and each group g (point to point):
      message     router -> g: [S] int64 counts, then [n, H] rows sorted by slot, as one uint8
                  buffer (`actors.dispatch.pack`); g receives it into a buffer big enough for
                  any step of that many tokens (gloo accepts a message shorter than the buffer;
                  on NCCL, which does not, the counts travel first and the rows after them)
      results     g -> router: [n, H] in the same order (skipped when n = 0: both sides know n)
Point to point rather than `all_to_all_single`: the groups never exchange anything with each
other, and an all-to-all needs a counts round first (receivers must know their splits) plus W*W
mostly empty messages per layer. Measured on a shared 2-core machine: one layer's exchange went
from 2.2-2.9x to 1.2-1.5x the cost of two bare all-to-alls (bench/cluster_step.py table 2; 1.15-1.3x
once the router's combine became one `embedding_bag`, see `kernels.moe.combine`), and
whole decode steps (router + 2 groups, the two protocols alternating in blocks of steps in the
same processes) from 32 to 23 ms median at 64 sequences, every decile lower at 1. What makes it
pay is one message each way with the counts inside and all of a layer's receives and sends posted
at once; an earlier point-to-point version (counts and rows as two messages received one after
the other, receives posted only after the sends completed) measured slower than the all-to-alls.
A dead peer fails the wait on its message; a hung one times out after `timeout_s` (gloo applies
the group's timeout to point-to-point waits).
"""

import enum
import gc
from dataclasses import dataclass
from typing import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


class Command(enum.IntEnum):
    IDLE = 0  # nothing to run; keeps the groups' header wait from timing out; a newer plan version activates it
    RUN = 1  # run one step with the active plan
    ACTIVATE = 2  # switch to the staged plan `version`, then run the step
    REFORM = 3  # leave the world; a new one is formed through Ray calls
    STOP = 4  # leave the world and stop serving


@dataclass(frozen=True)
class WorldSpec:
    store_host: str
    store_port: int
    world_size: int
    generation: int = 0
    backend: str = "gloo"
    timeout_s: float = 30.0


def host_store() -> tuple[dist.TCPStore, int]:
    """Start the rendezvous store on a free port (rank 0's process keeps it alive). -> (store, port)."""
    store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    return store, store.port


class World:
    """This process's membership in one world generation."""

    def __init__(self, spec: WorldSpec, rank: int, store: dist.Store | None = None):
        self.spec, self.rank = spec, rank
        timeout = timedelta(seconds=spec.timeout_s)
        store = store or dist.TCPStore(spec.store_host, spec.store_port, is_master=False, timeout=timeout)
        dist.init_process_group(spec.backend, store=dist.PrefixStore(f"world{spec.generation}", store),
                                rank=rank, world_size=spec.world_size, timeout=timeout)
        self.device = torch.device("cuda", torch.cuda.current_device()) if spec.backend == "nccl" else torch.device("cpu")
        self.group = dist.group.WORLD  # per-layer sends and receives call it directly: no per-call checks and logging

    @property
    def size(self) -> int:
        return self.spec.world_size

    def destroy(self) -> None:
        """Leave the world and close its connections, so that peers blocked on us raise at once.

        The process group closes its sockets only when the last reference to it goes: ours, and
        those of send/recv works still referenced somewhere (a failed step's traceback, say, kept
        alive by a reference cycle), hence the collection."""
        self.group = None
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()

    def send_header(self, header: Tensor) -> list[dist.Work]:
        """Rank 0: start sending the step header [4] int64 to every other rank; returns at once.
        Point to point rather than a broadcast, whose root waits until the collective is done: a
        step's header goes out with its first layer's messages and is waited for with them
        (`ExpertLink.send`), which took ~1 ms of blocking off every step (2 groups, 2-core VM)."""
        header = header.to(self.device)
        return [self.send(header, rank) for rank in range(1, self.size)]

    def recv_header(self) -> Tensor:
        """Ranks 1..: wait for the next step header from rank 0. -> [4] int64 on the CPU."""
        buf = torch.zeros(4, dtype=torch.long, device=self.device)
        self.recv(buf, 0).wait()
        return buf.cpu()

    def send_message(self, message: Tensor, dst: int, head_bytes: int) -> list[dist.Work]:
        """Start sending a message (uint8: a head of `head_bytes` that says how long the rest is, then
        the rest) to `dst`, for `recv_message`. gloo sends it whole; NCCL, whose receives must be of
        the exact size, sends the head first and the rest after it."""
        if self.spec.backend == "gloo":
            return [self.send(message, dst)]
        return [self.send(message[:head_bytes], dst), self.send(message[head_bytes:], dst)]

    def recv_message(self, inbox: Tensor, src: int, head_bytes: int, size_of: Callable[[Tensor], int]) -> None:
        """Receive a `send_message` message from `src` into the start of `inbox` (uint8 on `device`, at
        least as long as any message can be); `size_of(head)` is the whole message's size."""
        if self.spec.backend == "gloo":  # gloo takes a message shorter than the buffer
            self.recv(inbox, src).wait()
            return
        self.recv(inbox[:head_bytes], src).wait()
        self.recv(inbox[head_bytes:size_of(inbox[:head_bytes])], src).wait()

    def send(self, tensor: Tensor, dst: int) -> dist.Work:
        """Start sending `tensor` to rank `dst`; keep it unchanged until the returned work is waited."""
        return self.group.send([tensor.to(self.device).contiguous()], dst, 0)

    def recv(self, tensor: Tensor, src: int) -> dist.Work:
        """Start receiving from rank `src` into `tensor` (contiguous, on `device`)."""
        return self.group.recv([tensor], src, 0)
