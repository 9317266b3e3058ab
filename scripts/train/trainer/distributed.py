"""This process's place in a distributed job: rank 0 logs and writes, every rank trains on its
shard. One process (rank 0 of 1) unless torchrun or several SageMaker hosts start more."""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist

from trainer.report import say


@dataclasses.dataclass(frozen=True)
class Place:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    prefix: str = ""  # "tail 2| " in the process that trains a second tail (--tails)

    def log(self, *parts) -> None:
        if self.rank == 0:
            say(self.prefix + " ".join(map(str, parts)))

    def all_sum(self, values: list[float]) -> list[float]:
        if not dist.is_initialized():
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gathered(self, outputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """evaluate's (probabilities, targets) of every rank's shard of the validation split, on every rank."""
        if not dist.is_initialized():
            return outputs
        parts = [None] * self.world
        dist.all_gather_object(parts, outputs)
        return torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])


def setup() -> Place:
    """Multi-process under torchrun, or one process per SageMaker host; else one process."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    hosts = json.loads(os.environ.get("SM_HOSTS") or "[]")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun (or SageMaker's torch_distributed)
        dist.init_process_group(backend, init_method="env://")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    elif len(hosts) > 1:  # several instances, one process each: rank by position in SM_HOSTS
        current = os.environ.get("SM_CURRENT_HOST", hosts[0])
        port = os.environ.get("MASTER_PORT", "29500")
        dist.init_process_group(backend, init_method=f"tcp://{hosts[0]}:{port}",
                                rank=hosts.index(current), world_size=len(hosts))
        local_rank = 0
    else:
        return Place(device=torch.device("cuda" if cuda else "cpu"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Place(dist.get_rank(), dist.get_world_size(), device)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container CPU pinning, cpu_count() does not
    except AttributeError:
        return os.cpu_count() or 1
