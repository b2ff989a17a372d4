"""The world: one torch.distributed process group of the router (rank 0) and expert groups (1..G).

Rendezvous is explicit: the router hosts a `TCPStore` on a port the OS picks (never a fixed
one) and hands `(host, port)` out through Ray; each world *generation* lives under its own
store prefix, so the world can be destroyed and re-formed with other members between steps.
gloo runs on CPU tensors, NCCL on each rank's GPU; `World.device` says which.

The step protocol's collectives, all issued by every rank in the same order:
    header        broadcast from rank 0: [command, step, version, arg]
    counts        all_to_all_single of [W, S] int64 rows per (destination rank, slot)
    rows          all_to_all_single of [n, H] with uneven splits (bf16 as is: gloo takes it)

Measured on this design's alternative (bench/cluster_step.py, same code path, A/B): point-to-point
isend/irecv between the router and each group, which skips the counts collective and the empty
group-to-group messages, was ~2x *slower* than these all-to-alls on a 2-core machine.
"""

import enum
from dataclasses import dataclass
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

    @property
    def size(self) -> int:
        return self.spec.world_size

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def broadcast_header(self, header: Tensor | None = None) -> Tensor:
        """Rank 0 passes [4] int64; every rank gets it back."""
        buf = header.to(self.device) if header is not None else torch.zeros(4, dtype=torch.long, device=self.device)
        dist.broadcast(buf, src=0)
        return buf.cpu()

    def exchange_counts(self, send: Tensor) -> Tensor:
        """send [W, S] rows this rank sends each rank, per slot -> recv [W, S] rows it gets from each."""
        recv = torch.empty_like(send, device=self.device)
        dist.all_to_all_single(recv, send.to(self.device).contiguous())
        return recv.cpu()

    def exchange_rows(self, rows: Tensor, send_splits: list[int], recv_splits: list[int]) -> Tensor:
        """rows [sum(send_splits), H] -> [sum(recv_splits), H], uneven splits per rank."""
        out = torch.empty((sum(recv_splits), rows.shape[1]), dtype=rows.dtype, device=self.device)
        dist.all_to_all_single(out, rows.to(self.device).contiguous(), recv_splits, send_splits)
        return out.to(rows.device)
