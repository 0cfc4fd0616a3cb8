"""Processes and devices for a training run: torchrun's rank and world size, the device and autocast dtype, and
the few collectives the loop needs. Without torchrun (no WORLD_SIZE) it is one process and they are no-ops.

    torchrun --nproc_per_node 2 -m trainfer.cli train ...   # DDP (gloo on CPU, NCCL on CUDA); --set fsdp=true
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainfer.errors import TrainferError
from trainfer.train.metrics import cpu_has_bf16


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup_device(device: str, dtype: str) -> tuple[Dist, torch.device, torch.dtype]:
    """(this process, its device, the autocast dtype). "auto" picks CUDA when present and bf16 where the hardware
    computes it natively; the process group is joined here because NCCL needs to know the device kind."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if kind == "cuda" and not torch.cuda.is_available():
        raise TrainferError("device cuda was asked for but CUDA is not available")
    proc = init_distributed(kind)
    dev = torch.device(kind, proc.local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    want_bf16 = dtype == "bfloat16" or (
        dtype == "auto" and (torch.cuda.is_bf16_supported() if kind == "cuda" else cpu_has_bf16())
    )
    return proc, dev, torch.bfloat16 if want_bf16 else torch.float32


def shard(model: torch.nn.Module, proc: Dist) -> None:
    """FSDP2 in place: each block its own unit (gathered just before it runs), then the rest of the model."""
    if proc.world == 1:
        raise TrainferError("fsdp needs several processes: launch with torchrun --nproc_per_node N")
    from torch.distributed.fsdp import fully_shard  # ~0.7 s to import: only an FSDP run pays it, not every command

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)


def data_parallel(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def agree(result: dict[str, Any], proc: Dist, device: torch.device) -> dict[str, Any]:
    """Rank 0's evaluation for every rank: save and stop decisions (collectives) must not diverge."""
    if proc.world == 1:
        return result
    box = [result]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def average(value: torch.Tensor, proc: Dist) -> None:
    """In place: the mean over ranks (each rank's loss is over its own share of the batch)."""
    if proc.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG)


def barrier(proc: Dist) -> None:
    if proc.world > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, so that torchrun's workers exit cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()
