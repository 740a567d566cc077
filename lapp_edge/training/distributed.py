"""Training with several processes (DistributedDataParallel), set up from torchrun's environment.

    torchrun --standalone --nproc_per_node N -m lapp_edge train ...          (one machine)
    torchrun --nnodes M --node-rank I --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
             --nproc_per_node N -m lapp_edge train ...                       (M machines)

What each process does, and why (docs/GPU.md, "Multi-process training", says the same):

- **Process group**: from RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT), which
  torchrun sets. No WORLD_SIZE, or 1: one process, nothing is initialised and the trainer runs
  exactly as before. Backend: `nccl` when training on CUDA with one GPU per local process
  (process i uses cuda:LOCAL_RANK); `gloo` on the CPU, and on CUDA when the local processes
  outnumber the GPUs (they share them round-robin; NCCL refuses two processes on one GPU).
- **Data**: every process draws the same seeded permutation each epoch; each global batch of
  `--batch-size x WORLD_SIZE` images is shared out strided by rank (`data.torch_data.iterate_batches`),
  with the augmentation drawn for the whole global batch so every image gets the crop/flip a
  single process would give it. `--batch-size` is per process; the learning rate is not scaled
  (pass --lr for the global batch you chose). A last global batch with fewer images than
  processes is left out.
- **Gradients**: the model is wrapped in DDP (gradients averaged during backward). The LAPP
  thresholds (`LappController.thresholds`) are *not* wrapped: they enter the graph through the
  masks the controller sets on the units before the model's forward, outside any module
  forward DDP could hook (DDP's reducer is armed by its own forward and syncs only the wrapped
  module's parameters). Their gradients are averaged explicitly after backward
  (`average_gradients`, one all-reduce of a vector of one float per prunable site), before the
  threshold optimizer steps. Weights, thresholds, hence scores and masks, stay bitwise equal on
  every process.
- **BatchNorm**: plain BN per process (statistics of the process's share of the batch); DDP
  broadcasts rank 0's running statistics before every training forward. Evaluation is sharded
  (every process a strided share of the test split, counts summed) with rank 0's statistics
  broadcast first; BN re-estimation at freeze runs on each process's share of the same batches
  and averages the running means and variances. SyncBatchNorm is not used (small world sizes).
- **Freeze**: the plan (widths and kept channels) is computed on every process from identical
  thresholds and weights, compared across processes (`agree`), and rank 0's is applied
  everywhere. The slimmed model has new parameters, so it is wrapped in DDP again (which also
  copies rank 0's weights and buffers to every process).
- **Files**: only rank 0 (`RunDirectory(writer=True)`) takes the lock and writes; every process
  reads the same checkpoint to resume.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from lapp_edge.errors import UserError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise UserError(f"{name} is not set: start several processes with torchrun (it sets {', '.join(ENV_VARS)})")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def choose_backend(device_type: str, gpus: int, local_world: int) -> tuple[str, bool]:
    """(backend, one GPU per process): nccl only on CUDA with at least one GPU per local process."""
    if device_type == "cuda" and gpus >= local_world:
        return "nccl", True
    return "gloo", False


@dataclass
class DistContext:
    """Where this process stands: rank, world size, local rank, its device and the backend
    (None when training alone). `enabled` is False for one process: every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # --- the model ------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: DDP around `model` (constructing it copies rank 0's
        parameters and buffers to every process), or `model` itself for one process."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP's default: rank 0's buffers (BN running statistics) are broadcast before every forward
        # (the argument that says so was renamed in torch 2.14, so it is left at its default)
        return DistributedDataParallel(model, device_ids=device_ids)

    def average_gradients(self, tensors: list[torch.Tensor]) -> None:
        """Average the gradients of `tensors` (parameters outside DDP: the LAPP thresholds) over
        the processes, in place. A tensor without gradient counts as zero, so every process
        takes part in the same collectives."""
        if not self.enabled:
            return
        for tensor in tensors:
            if tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
            torch_dist.all_reduce(tensor.grad, op=torch_dist.ReduceOp.SUM)
            tensor.grad.div_(self.world_size)

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values of `tensors` (buffers, parameters) to every process, in place."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in tensors:
                torch_dist.broadcast(tensor.data, src=0)

    def average_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Replace `tensors` by their mean over the processes, in place (floating point only)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in tensors:
                torch_dist.all_reduce(tensor.data, op=torch_dist.ReduceOp.SUM)
                tensor.data.div_(self.world_size)

    def sum_values(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the processes (float64: exact for counts)."""
        if not self.enabled:
            return list(values)
        buffer = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.SUM)
        return [float(v) for v in buffer.tolist()]

    def agree(self, value: Any) -> tuple[Any, bool]:
        """(rank 0's `value`, whether every process holds an equal one). Picklable values."""
        if not self.enabled:
            return value, True
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, value)
        return gathered[0], all(item == gathered[0] for item in gathered)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        """Leave the process group (once, at the end of the run)."""
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def single_process(device: torch.device) -> DistContext:
    return DistContext(device=device)


def launched_by_torchrun() -> bool:
    return _env_int("WORLD_SIZE", 1) > 1


def is_main_process() -> bool:
    """True unless this is a process other than rank 0 of a multi-process run (for printing)."""
    return _env_int("RANK", 0) == 0


def setup_from_env(device: torch.device) -> DistContext:
    """The DistContext from torchrun's environment, with the process group initialised when
    WORLD_SIZE > 1. `device` is the training device asked for (cpu or cuda); on CUDA each process
    gets its own GPU (cuda:LOCAL_RANK) when there are enough, else they share them round-robin.
    Raises UserError (one line) on a malformed environment."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return single_process(device)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise UserError(f"RANK={rank} / LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world} / LOCAL_WORLD_SIZE={local_world}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(f"{name} is not set: start several processes with torchrun")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    backend, own_gpu = choose_backend(device.type, gpus, local_world)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if own_gpu else local_rank % gpus)
        torch.cuda.set_device(device)
    options: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world,
                               "timeout": datetime.timedelta(minutes=30)}
    if backend == "nccl":
        options["device_id"] = device
    torch_dist.init_process_group(**options)
    context = DistContext(rank, world, local_rank, device, backend)
    if context.is_writer:
        shared = "" if own_gpu or device.type != "cuda" else f", {local_world} processes sharing {gpus} GPU(s)"
        print(f"distributed: {world} processes, backend {backend}, device {device.type}{shared}; "
              f"global batch = --batch-size x {world}", file=sys.stderr, flush=True)
    return context
