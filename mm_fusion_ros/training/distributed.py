"""torchrun / DistributedDataParallel plumbing: process group, device, reductions.

Under `torchrun --nproc_per_node=N` the environment carries RANK, WORLD_SIZE and LOCAL_RANK;
gloo is used on CPU and nccl on CUDA. Without them everything runs as a single process.
"""
from dataclasses import dataclass
import gc
import os

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> torch.device (the offline trainer, prediction and the online
    node); ValueError when CUDA is asked for but absent."""
    if name not in ('auto', 'cpu', 'cuda'):
        raise ValueError(f'device {name!r} not understood; choose auto, cpu or cuda')
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('device cuda requested but torch sees no CUDA device')
    if name == 'cpu' or (name == 'auto' and not torch.cuda.is_available()):
        return torch.device('cpu')
    return torch.device('cuda', local_rank % torch.cuda.device_count())


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError as e:
        raise ValueError(f'environment variable {name}={text!r} is not an integer') from e


def init_distributed(device_name: str) -> DistInfo:
    world = _env_int('WORLD_SIZE', 1)
    if world <= 1:
        return DistInfo(device=resolve_device(device_name))
    rank, local_rank = _env_int('RANK', 0), _env_int('LOCAL_RANK', 0)
    device = resolve_device(device_name, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum over processes (identity when single-process); returns a CPU tensor."""
    if not info.enabled:
        return values
    t = values.to(info.device if info.device.type == 'cuda' else 'cpu', torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Tear the process group down once every rank is done and nothing refers to it: the DDP
    wrapper sits in reference cycles, and collected only at interpreter exit, after the group
    was destroyed, its reducer aborted a rank now and then ('terminate called without an
    active exception', seen once in a loaded test run)."""
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
