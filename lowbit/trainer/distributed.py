"""Process-group setup from torchrun's environment, and the few collectives the loop needs."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowbit.trainer.config import Device, DistBackend, DistConfig


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: DistBackend

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: Device | str, local_rank: int, world: int) -> torch.device:
    requested = Device(requested)
    if requested is Device.cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "train.device=cuda but CUDA is not available on this machine (valid: auto, cpu, cuda)"
        )
    use_cuda = requested is Device.cuda or (requested is Device.auto and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise RuntimeError(
            f"this node runs {int(os.environ.get('LOCAL_WORLD_SIZE', world))} processes but has only "
            f"{n} GPU(s): "
            f"local rank {local_rank} has no device. Use --nproc_per_node<={n}."
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(cfg: DistConfig, device: Device | str) -> DistContext:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun) and start the process group if asked to."""
    backend = DistBackend(cfg.backend)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and backend is DistBackend.none:
        raise RuntimeError(
            f"launched with WORLD_SIZE={world} but dist.backend=none; pass dist=ddp or dist=deepspeed"
        )
    if backend is DistBackend.deepspeed and cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"dist.zero_stage={cfg.zero_stage} is not valid (valid choices: 0, 1, 2, 3)")
    dev = pick_device(device, local_rank, world)
    if backend is not DistBackend.none and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        pg = cfg.pg_backend if cfg.pg_backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        if pg not in ("nccl", "gloo"):
            raise ValueError(
                f"dist.pg_backend={cfg.pg_backend!r} is not valid (valid choices: auto, nccl, gloo)"
            )
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(pg, rank=rank, world_size=world, **kwargs)
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev, backend=backend)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed and ctx.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, ctx: DistContext) -> object:
    if not (ctx.distributed and ctx.world > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed and ctx.world > 1:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.destroy_process_group()
