"""Training: dense, or LAPP from scratch (prune progressively, freeze, slim, go on slim).

One epoch = one pass over the (optionally subsampled) training split. The run directory
(`run_dir.RunDirectory`) gets an atomic checkpoint after every epoch, so a killed run loses
at most one epoch and `resume=True` continues it exactly (CPU, fixed seed: shuffling and
augmentation draw from a generator seeded per epoch, the learning rate is a pure function
of the step). The loop is the same for every phase; what LAPP adds to a step lives in
`task.LappTask`, and the report is built from the run's state (`report.RunSummary`).

Several processes (`torchrun ... -m lapp_edge train`): `distributed.DistContext` holds the rank,
the device and the collectives; `self.model` stays the plain module (checkpoints, freeze, the
report) and `self.train_model` is its DDP wrapper, which the training step calls. Each hook is
marked "distributed" below; with one process every one of them is a no-op.

On CUDA, in-memory datasets are moved to the GPU once (`torch_data.to_device`) and shuffled and
augmented there with a CUDA generator; the step runs under bf16 autocast on channels_last.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lapp_edge.data.torch_data import (
    Dataset, DataOptions, batch_count, configure, iterate_batches, load_dataset, shard_split, split_device, subset_split,
    to_device,
)
from lapp_edge.errors import UserError
from lapp_edge.lapp.controller import FreezeResult, LappConfig, LappController, site_min_widths
from lapp_edge.lapp.cost import CostModel
from lapp_edge.lapp.flops import build_flops_cost
from lapp_edge.training.latency import LatencyConstraint, latency_constraint, predicted_ratios, resolve_channel_multiple
from lapp_edge.lapp.freeze import freeze
from lapp_edge.training.landing import LANDING_AIM, Landing, Measure, land_on_measured
from lapp_edge.lapp.widths import allowed_widths, smallest_cost_ratio, target_widths
from lapp_edge.models import BLOCK_REMOVAL_MODELS, build_model, prunable_sites
from lapp_edge.models.reparam import bake, bypass_units, drop_bypass, merge_bypass, use_bypass_mode
from lapp_edge.models.slicing import resize_to_widths
from lapp_edge.models.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec
from lapp_edge.training.config import TrainConfig, merges_bypass_at_freeze, validate_config
from lapp_edge.training.distributed import DistContext, setup_from_env, single_process
from lapp_edge.training.report import RunSummary, write_report
from lapp_edge.training.run_dir import CHECKPOINT, CONFIG, RunDirectory, RunState, run_state_from
from lapp_edge.training.task import DenseTask, LappTask

__all__ = ["CHECKPOINT", "CONFIG", "EpochRecord", "RunState", "TrainConfig", "Trainer", "run_training"]


@dataclass
class EpochRecord:
    """One completed epoch: times in seconds, accuracies as fractions, the cost ratio at its end."""

    epoch: int
    phase: str
    seconds: float                     # wall clock
    cpu_seconds: float                 # this process's CPU time (robust on a shared machine)
    train_loss: float
    train_top1: float
    test_top1: float
    flops_ratio: float
    lr: float
    latency_ratio: float | None = None     # predicted by the target's layer table (latency-constrained runs)


def bypass_merged_in(state: RunState) -> bool:
    """Whether the run's freeze merged its bypasses (the default; not --keep-bypass-after-freeze): its slim
    network has none."""
    return bool((state.freeze or {}).get("bypass_merged"))


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at `step` of `total_steps`: cosine to 0, or x0.1 at 50% and 75% ("step")."""
    progress = step / max(1, total_steps)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (0.1 ** (int(progress >= 0.5) + int(progress >= 0.75)))


def data_options(config: TrainConfig) -> DataOptions:
    """The data settings of a run (what `load_dataset` shapes the data by)."""
    return DataOptions(config.input_size, config.augment, config.mean, config.std, config.train_subset, config.test_subset,
                       config.seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """One run: model, optimizer, the phase's task (dense or LAPP), evaluation, freeze.

    Raises UserError on bad settings, an unreachable cost target, a diverged loss or a
    checkpoint that does not fit."""

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None, run_dir: RunDirectory | None = None,
                 dist: DistContext | None = None, measure: Measure | None = None) -> None:
        validate_config(config)
        self.config = config
        self.measure = measure            # latency runs: measures the freeze's plan on a target (training/landing.py)
        self.dist = dist or single_process(resolve_device(config.device))   # distributed: rank, device, collectives
        self.run_dir = run_dir or RunDirectory(config.out, writer=self.dist.is_writer)
        self.out = self.run_dir.path
        self.device = self.dist.device
        self.show_progress = config.progress and self.dist.is_writer
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True      # shapes are fixed within a phase
        options = data_options(config)
        self.data = configure(dataset, options) if dataset is not None else load_dataset(config.dataset, config.data_dir, options)
        # the data's decisions (input size, augmentation, mean/std) become the run's settings, so a
        # resumed run reads exactly the same data and the config says what was trained on
        self.config = config = replace(config, **self.data.extra["resolved"], channel_multiple=resolve_channel_multiple(config))
        for flag, count, split in (("--train-subset", config.train_subset, self.data.train), ("--test-subset", config.test_subset, self.data.test)):
            if count > len(split):  # type: ignore[arg-type]
                raise UserError(f"{flag} {count} is more than the {len(split)} images there are")  # type: ignore[arg-type]
        # GPU-resident input pipeline: an in-memory split is moved to the GPU once (no-op on the CPU)
        self.train_split = to_device(subset_split(self.data.train, config.train_subset, config.seed), self.device)
        self.test_split = to_device(subset_split(self.data.test, config.test_subset, config.seed + 1), self.device)
        if len(self.train_split) < 2:  # type: ignore[arg-type]
            raise UserError(f"training needs at least 2 images (BatchNorm cannot train on one); the training split has {len(self.train_split)}")  # type: ignore[arg-type]
        info = self.data.info
        self.input_shape = (info.in_channels, info.input_size, info.input_size)
        self.steps_per_epoch = batch_count(self.train_split, config.batch_size, self.dist.world_size, train=True)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.prune_steps = 0 if config.dense else config.prune_epochs * self.steps_per_epoch
        self.amp = self.device.type == "cuda"
        self.channels_last = self.amp or config.memory_format == "channels_last"

        torch.manual_seed(config.seed)
        self.model = build_model(config.model, info.in_channels, info.num_classes, config.bypass and not config.dense,
                                 config.coupled_groups and not config.dense, input_size=info.input_size)
        self._check_model_takes_inputs()
        self.layout_note = ""              # why the run trains NCHW although channels_last was asked for
        if self.channels_last:
            self.channels_last = self._runs_in_channels_last()
        use_bypass_mode(self.model, config.bypass_mode)
        self.sites = prunable_sites(self.model)
        if config.block_removal and not any(site.removal is not None for site in self.sites):
            raise UserError(f"--block-removal: {config.model} has no residual branch LAPP can remove ({BLOCK_REMOVAL_MODELS} "
                            "have); drop --block-removal")
        self.dense_widths = {site.name: site.channels for site in self.sites}
        self.flops_cost = build_flops_cost(self.model, self.sites, self.input_shape)
        self.cost: CostModel = self.flops_cost
        self.latency: LatencyConstraint | None = None
        if config.latency_constrained and not config.dense:
            self.latency = latency_constraint(config, self.model, self.sites, self.input_shape, self.flops_cost)
            self.cost = self.latency.cost
        self.lapp_settings = config.lapp_config(self.latency.target_ratio if self.latency else None)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = self._make_optimizer()
        self.train_model = self.dist.wrap(self.model)        # distributed: DDP (the model itself for one process)
        self.task: DenseTask | LappTask = DenseTask()
        self.state = RunState(phase="dense" if config.dense else "pruning", widths=dict(self.dense_widths))
        if not config.dense:
            self._check_target_reachable()
            # distributed: the thresholds sit outside DDP; their gradients are averaged explicitly
            self.task = LappTask(LappController(self.sites, self.cost, self.lapp_settings).to(self.device),
                                 self.prune_steps, config.trace_every,
                                 self.dist.average_gradients if self.dist.enabled else None)

    @property
    def controller(self) -> LappController | None:
        return self.task.controller if isinstance(self.task, LappTask) else None

    # --- construction ------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.model.parameters(), lr=self.config.lr, momentum=self.config.momentum,
            weight_decay=self.config.weight_decay, nesterov=True,
        )

    def _check_model_takes_inputs(self) -> None:
        """One image through the model in eval mode (nothing changes) before anything is written: an
        input the model cannot take is refused, and so is --batch-size 1 where a BatchNorm layer
        sees 1x1 maps (one value per channel cannot be normalised in training)."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        smallest: list[int] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: smallest.append(int(out[0, 0].numel()))) for m in norms]
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, *self.input_shape))
        except (RuntimeError, ValueError) as error:
            first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            c, h, w = self.input_shape
            raise UserError(f"{self.config.model} cannot take {c}x{h}x{w} inputs: {first}; choose another --input-size or --model") from None
        finally:
            for hook in hooks:
                hook.remove()
            self.model.train()
        if self.config.batch_size == 1 and smallest and min(smallest) == 1:
            raise UserError(f"--batch-size 1: {self.config.model} on {self.input_shape[1]}x{self.input_shape[2]} inputs has "
                            "BatchNorm layers on 1x1 maps, which cannot train on one image per batch; use --batch-size 2 or more")

    def _runs_in_channels_last(self) -> bool:
        """One image through the model in channels_last (eval mode, nothing changes). A model that
        reshapes activations with `.view` needs NCHW strides and cannot: False, the model goes back to
        NCHW, and `decisions` says so in one line (a user's model is not refused for its layout)."""
        self.model.to(memory_format=torch.channels_last)
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, *self.input_shape).contiguous(memory_format=torch.channels_last))
            return True
        except RuntimeError as error:
            first = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            self.layout_note = (f"layout: {self.config.model} does not run in channels_last ({first}); it trains "
                                "NCHW, as --memory-format contiguous")
            self.model.to(memory_format=torch.contiguous_format)
            return False
        finally:
            self.model.train()

    def decisions(self) -> list[str]:
        """What was decided before training, for the user: the data's lines, the batch arithmetic, the target."""
        config, size = self.config, len(self.train_split)  # type: ignore[arg-type]
        lines = list(self.data.extra.get("decisions", []))
        batches = f"training: {size} images in batches of {config.batch_size}: {self.steps_per_epoch} step(s) per epoch"
        if size % config.batch_size == 1 and size > 1:
            batches += ("; the last batch of each epoch would hold 1 image and is dropped (BatchNorm cannot train on one image; "
                        "shuffling puts it in another batch next epoch)")
        lines.append(batches + f"; evaluation on {len(self.test_split)} images")  # type: ignore[arg-type]
        if self.layout_note:
            lines.append(self.layout_note)
        if self.latency is not None:
            for entry in self.latency.shaped_for:
                lines.append(f"LAPP: latency on {entry['target']} at batch {entry['batch']} kept to {entry['budget_ratio']:.4f} of "
                             f"the dense network's predicted {entry['dense_predicted_ms']:.3f} ms ({entry['budget_ms']:.3f} ms), "
                             f"from {entry['table']}")
            if self.latency.flops_bound is not None:
                lines.append(f"LAPP: FLOPs landed on {self.latency.flops_bound[1]:.4f} of the dense network's, each latency "
                             "kept under its budget (--max-flops --land-on-flops)" if self.latency.land_on_flops else
                             f"LAPP: FLOPs kept to at most {self.latency.flops_bound[1]:.4f} of the dense network's as well "
                             "(--max-flops; the tightest budget binds)")
            reachable = ("the FLOPs target is reachable under every latency budget" if self.latency.land_on_flops
                         else "the tightest budget is reachable")
            lines.append(f"LAPP: widths in multiples of {config.channel_multiple}: {reachable} (the "
                         f"freeze's width search lands on {self.target_ratio:.4f} before training)")
            if config.measure_at_freeze and self.measure is not None:
                miss = ("measure over a latency ceiling" if self.latency.land_on_flops
                        else f"miss the budget by more than {LANDING_AIM:.0%}")
                lines.append(f"LAPP: at freeze the planned widths are measured on each target and planned again where they "
                             f"{miss} [--no-measure-at-freeze: the table alone]")
            elif config.measure_at_freeze:
                lines.append("LAPP: the freeze's widths come from the table alone (no measurer given to the trainer)")
            else:
                lines.append("LAPP: the freeze's widths come from the table alone [--no-measure-at-freeze]")
        elif not config.dense:
            lines.append(f"LAPP: FLOPs target {config.flops_target} with widths in multiples of {config.channel_multiple}: "
                         f"reachable (the freeze's width search lands on {self.target_ratio:.4f} before training)")
        return lines

    def _check_target_reachable(self) -> None:
        """Refuse, before anything is written, a target that no width combination meets: the floor
        (every site at its smallest width), then the freeze's own fallback width search (`target_widths`)."""
        lapp = self.lapp_settings
        landed = self.latency is not None and self.latency.land_on_flops
        what = (f"FLOPs target {self.config.flops_target}" if self.latency is None else
                f"FLOPs target {lapp.target} under the latency budgets on {', '.join(e['target'] for e in self.latency.shaped_for)}"
                if landed else f"latency target {lapp.target:.4f} (of the dense latency on {', '.join(e['target'] for e in self.latency.shaped_for)}"
                + (f"; FLOPs at most {self.latency.flops_bound[1]}" if self.latency.flops_bound else "") + ")")
        minimums = site_min_widths(self.sites, lapp)
        floor = smallest_cost_ratio(self.cost, lapp.channel_multiple, minimums)
        fixed = all(len(allowed_widths(c, lapp.channel_multiple, low)) == 1 for c, low in zip(self.cost.site_channels, minimums))
        if floor > lapp.target + lapp.tolerance and not fixed:
            raise UserError(
                f"{what} cannot be reached: with every prunable layer of {self.config.model} at its minimum width "
                f"({lapp.minimum_words('--max-pruning-ratio')}) the network keeps {floor:.3f} of its {self.cost.name}"
                + self._lower_floor_hint(lapp)
            )
        widths, ratio = target_widths(self.cost, lapp.target, lapp.channel_multiple, minimums, aim=lapp.tolerance * 0.4)
        self.target_ratio = ratio
        over = float(self.cost.ceiling_excess(widths.astype(float))) if landed else 0.0  # type: ignore[attr-defined]
        if landed and (over > 0 or abs(ratio - lapp.target) > lapp.tolerance):
            raise UserError(f"{what} cannot be met: the closest network the width search finds keeps FLOPs {ratio:.4f} at "
                            f"{over:.1%} over the tightest latency budget in the table; loosen --latency-target or lower --max-flops")
        if abs(ratio - lapp.target) > lapp.tolerance:
            why = (f"with --channel-multiple {lapp.channel_multiple} every prunable layer of {self.config.model} "
                   f"({min(self.cost.site_channels)}-{max(self.cost.site_channels)} channels) can only keep its full width"
                   if fixed else f"the closest network with widths that are multiples of {lapp.channel_multiple} keeps {ratio:.4f}")
            raise UserError(
                f"{what} cannot be met within +-{lapp.tolerance}: {why}; "
                f"choose another {'--flops-target' if self.latency is None else '--latency-target'} or --channel-multiple"
            )

    def _lower_floor_hint(self, lapp: LappConfig) -> str:
        """The settings under which the target's floor would sit below it, as the end of the unreachable
        target's message: no share floor where --max-pruning-ratio sets one, a channel multiple of 8 where a
        larger one is set (a target profile's own multiple, e.g. 32 for OpenVINO bf16 on AMX, can leave
        ResNet-20's 16- and 32-channel stages one width each), and --block-removal where the model has
        removable residual branches. Empty where none reaches it."""
        options = []
        if lapp.max_pruning_ratio < 1:
            options.append(("--max-pruning-ratio 1", replace(lapp, max_pruning_ratio=1.0)))
        if lapp.channel_multiple > 8:
            options.append(("--channel-multiple 8", replace(lapp, channel_multiple=8, min_channels=min(lapp.min_channels, 8))))
        if not lapp.block_removal and any(site.removal is not None for site in self.sites):
            options.append(("--block-removal", replace(lapp, block_removal=True, keep_blocks=0)))
        reached = []
        for flag, settings in options:
            floor = smallest_cost_ratio(self.cost, settings.channel_multiple, site_min_widths(self.sites, settings))
            if floor <= lapp.target:
                reached.append(f"{flag} (floor {floor:.3f})")
        return f"; it is within reach with {' or '.join(reached)}" if reached else ""

    # --- checkpointing -----------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        lapp = self.task.state_dict() if isinstance(self.task, LappTask) else {"controller": None, "threshold_optimizer": None}
        return {
            "config": asdict(self.config),
            "state": asdict(self.state),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **lapp,
        }

    def save_checkpoint(self) -> None:
        self.run_dir.save_checkpoint(self.checkpoint_payload())

    def load_checkpoint(self) -> None:
        payload = self.run_dir.load_checkpoint()
        path = self.run_dir.checkpoint_path
        try:
            state = run_state_from(payload)
            if state.phase == "slim":
                self._resize_to_slim(state.widths, merged=bypass_merged_in(state))
            self.model.load_state_dict(payload["model"])
            if state.phase == "slim":
                self.train_model = self.dist.wrap(self.model)    # distributed: the slim model has new parameters
            self.optimizer.load_state_dict(payload["optimizer"])
            if isinstance(self.task, LappTask):
                self.task.load_state_dict(payload)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"checkpoint {path} does not fit this run: {first[:200]}") from None
        self.state = state

    # --- training ----------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = learning_rate(self.config, self.state.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _forward(self, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        model = model or self.model
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(images)
        return model(images)

    def _generator(self, seed: int) -> torch.Generator:
        """A generator on the device the training images live on (CUDA for the GPU-resident pipeline)."""
        return torch.Generator(device=split_device(self.train_split)).manual_seed(seed)

    def _batches(self, generator: torch.Generator) -> Any:
        """This process's shuffled, augmented training batches (distributed: its share of each global batch)."""
        return iterate_batches(self.train_split, self.data.info, self.config.batch_size, self.device, generator,
                               train=True, rank=self.dist.rank, world=self.dist.world_size)

    def _diverged(self, total: torch.Tensor, epoch: int) -> UserError:
        kept = (f"the last good checkpoint ({self.out / CHECKPOINT}, epoch {epoch}) was kept. Lower --lr and resume or restart"
                if epoch > 0 else "no epoch had completed, so there is no checkpoint. Lower --lr and restart")
        return UserError(f"training diverged: the loss became {total.item()} at epoch {epoch + 1}, step {self.state.step}; {kept}")

    def train_epoch(self) -> EpochRecord:
        """One pass over the training split with the phase's task; returns the epoch's record
        (test_top1 is filled in by `run`). Raises UserError when the loss stops being finite."""
        config, task = self.config, self.task
        epoch = self.state.epoch
        generator = self._generator(config.seed * 100_003 + epoch)
        self.model.train()
        started, cpu_started = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        lr = self._set_lr()
        ratio = 1.0 if self.state.phase == "dense" else self.current_cost_ratio()
        bar = tqdm(self._batches(generator), total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs} [{self.state.phase}]",
                   disable=not self.show_progress, leave=False, dynamic_ncols=True)
        # on CUDA the loss is checked every 20 steps (each check waits for the GPU); a non-finite loss is remembered
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        for batch_index, (images, labels) in enumerate(bar):
            lr = self._set_lr()
            task.before_forward()
            logits = self._forward(images, self.train_model)
            loss = F.cross_entropy(logits.float(), labels)
            total = task.loss(loss, self.state.step)
            if self.device.type != "cuda":
                if not torch.isfinite(total):
                    raise self._diverged(total, epoch)
            else:
                nonfinite |= ~torch.isfinite(total.detach())
                if (batch_index % 20 == 0 or batch_index == self.steps_per_epoch - 1) and bool(nonfinite):
                    raise self._diverged(total, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            task.zero_grad()
            total.backward()
            self.optimizer.step()
            task.after_step(self.state.step, self.state)
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            self.state.step += 1
            if batch_index % 20 == 0 or batch_index == self.steps_per_epoch - 1:
                ratio = task.cost_ratio() or ratio
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}", **{self.cost.name: f"{ratio:.3f}"})
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        # distributed: the record holds the whole global batch's loss and accuracy (one collective per epoch)
        total_loss, total_correct, total_seen = self.dist.sum_values([loss_sum.item(), float(correct.item()), float(seen)])
        return EpochRecord(epoch + 1, self.state.phase, seconds, cpu_seconds, total_loss / max(1, total_seen),
                           total_correct / max(1, total_seen), float("nan"), ratio, lr)

    def current_counts(self) -> torch.Tensor:
        """Kept counts per site: the hard counts now (pruning) or the current widths."""
        if self.controller is not None:
            return torch.tensor(self.controller.hard_counts(), dtype=torch.float64)
        return torch.tensor([self.state.widths[s] for s in self.dense_widths], dtype=torch.float64)

    def current_cost_ratio(self) -> float:
        """The cost ratio (what LAPP constrains) of the current kept counts."""
        return float(self.cost.ratio(self.current_counts()))

    def current_latency_ratio(self) -> float:
        """The latency the tables predict for the current kept counts (latency-constrained runs): the
        cost ratio, except with --land-on-flops, whose cost is the FLOPs (latency is its ceilings')."""
        latency_ratio = getattr(self.cost, "latency_ratio", None)
        counts = self.current_counts()
        return float(latency_ratio(counts)) if latency_ratio is not None else float(self.cost.ratio(counts))

    def current_flops_ratio(self) -> float:
        return float(self.flops_cost.ratio(self.current_counts()))

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> float:
        """Top-1 accuracy (fraction) on the test split, with hard masks during pruning.
        Distributed: rank 0's BN statistics are copied to every process, each evaluates a strided
        share of the test split, and the counts are summed."""
        model = model or self.model
        model.eval()
        if self.controller is not None and self.state.phase == "pruning":
            self.controller.update_masks(with_grad=False)
        self.dist.broadcast_tensors(list(model.buffers()))
        correct, seen = 0, 0
        test_split = shard_split(self.test_split, self.dist.rank, self.dist.world_size)
        for images, labels in iterate_batches(test_split, self.data.info, 500, self.device):
            correct += int((self._forward(images, model).argmax(1) == labels).sum())
            seen += len(labels)
        correct, seen = self.dist.sum_values([float(correct), float(seen)])
        return correct / max(1, seen)

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: int) -> None:
        """Re-estimate BN running statistics on `batches` training batches (cumulative average):
        statistics gathered while masks moved are stale once they are frozen."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved_momentum = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        self.model.train()
        generator = self._generator(self.config.seed + 7)
        for index, (images, _) in enumerate(self._batches(generator)):
            if index >= batches:
                break
            self._forward(images)
        for norm, momentum in zip(norms, saved_momentum):
            norm.momentum = momentum
        # distributed: each process saw its share of the same global batches; average their statistics
        self.dist.average_tensors([t for m in norms for t in (m.running_mean, m.running_var) if t is not None])

    def freeze(self) -> FreezeResult:
        """End of the pruning phase: round widths, fix masks, slim physically, recalibrate BN."""
        assert self.controller is not None
        started, cpu_started = time.perf_counter(), time.process_time()
        plan = agreed = None
        if self.dist.enabled:
            # distributed: thresholds and weights are equal on every process, so are the plans; check,
            # and apply rank 0's everywhere
            plan = self.controller.plan_freeze()
            plan, agreed = self.dist.agree(plan)
            if not agreed and self.dist.is_writer:
                print("warning: the processes planned different widths at freeze; rank 0's plan is applied everywhere",
                      file=sys.stderr, flush=True)
        landing = self.measured_landing()
        if landing is not None:        # None in the plan: measuring failed, or the table's plan misses (freeze says so)
            plan = landing[0] or plan
        plan = freeze(self.controller, self.optimizer, plan)
        # the cost of the widths LAPP learned, before rounding and the width search (the controller's own cost:
        # the table's where latency is constrained): how far the freeze had to move the network from them
        learned = np.array([plan.unrounded[site.name] for site in self.controller.sites], dtype=np.float64)
        learned_cost_ratio = float(self.controller.cost.ratio(learned))
        self.task = DenseTask()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.recalibrate_batchnorm(self.config.bn_recalibration_batches)
        merging = merges_bypass_at_freeze(self.config)
        merged = self.merge_bypass() if merging else 0
        self.train_model = self.dist.wrap(self.model)   # distributed: new parameters; copies rank 0's to every process
        self.state.phase = "slim"
        self.state.widths = dict(plan.widths)
        self.state.freeze = asdict(plan)
        self.state.freeze["learned_cost_ratio"] = learned_cost_ratio
        if merging:
            self.state.freeze["bypass_merged"] = merged
        # the freeze's own time (landing measurements, BN re-estimation, the merge) is in no epoch's record
        self.state.freeze["seconds"] = time.perf_counter() - started
        self.state.freeze["cpu_seconds"] = time.process_time() - cpu_started
        if self.dist.enabled:
            self.state.freeze["processes"] = {"world_size": self.dist.world_size, "plans_identical": agreed}
        if landing is not None:
            self.state.freeze["landing"] = asdict(landing[1])
        return plan

    def merge_bypass(self) -> int:
        """The freeze's bypass merge (the default; not with --keep-bypass-after-freeze): each bypass merged
        into its kxk conv (`models.reparam.merge_bypass`, exact in eval mode; the merged BN's statistics from
        `bn_recalibration_batches` training batches, averaged over the processes), and a new optimizer whose
        momentum is kept for every tensor that kept its values (reset for the merged convs and BNs; a baked
        reparam unit's conv weight is a new tensor, so it starts without momentum too). Returns how many units
        had a bypass. Distributed: every process computes the same merge; the DDP wrap that follows copies
        rank 0's to the rest."""
        count = len(bypass_units(self.model))
        generator = self._generator(self.config.seed + 11)
        batches = (images for _, (images, _labels) in zip(range(self.config.bn_recalibration_batches), self._batches(generator)))
        merged = merge_bypass(self.model, batches, self._forward, self.dist.average_tensors if self.dist.enabled else None)
        reset = {id(t) for unit in merged for t in (unit.conv.weight, unit.conv.bias, unit.bn.weight, unit.bn.bias) if t is not None}
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        previous, self.optimizer = self.optimizer, self._make_optimizer()
        for parameter in self.model.parameters():
            if id(parameter) not in reset and parameter in previous.state:
                self.optimizer.state[parameter] = previous.state[parameter]
        return count

    def measured_landing(self) -> tuple[FreezeResult | None, Landing] | None:
        """Latency runs with --measure-at-freeze (the default) and a `measure`: the freeze's plan measured on
        each target and planned again where it misses its budget (training/landing.py); rank 0 measures,
        every process applies its plan. None where nothing is measured. A failed measurement (a runtime
        missing, a compile error) returns no plan (the caller keeps the table's), with a one-line warning
        recorded in the landing."""
        if self.latency is None or not self.config.measure_at_freeze or self.measure is None or self.controller is None:
            return None
        result: tuple[FreezeResult | None, Landing] | None = None
        if self.dist.is_writer:
            budgets = {entry["target"]: entry["budget_ratio"] for entry in self.latency.shaped_for}
            batches = {entry["target"]: entry["batch"] for entry in self.latency.shaped_for}
            try:
                result = land_on_measured(self.controller, self.latency.per_target, budgets, batches,
                                          self.architecture_spec(), self.measure, flops_bound=self.latency.flops_bound,
                                          land_on_flops=self.latency.land_on_flops)
            except Exception as error:  # noqa: BLE001 - the run goes on with the table's plan; the reason is kept
                note = f"the freeze's plan could not be measured ({type(error).__name__}: {error}); the table's plan is applied"
                print(f"warning: {note}", file=sys.stderr, flush=True)
                result = (None, Landing(budgets, batches, LANDING_AIM, note=note))
            if self.show_progress:
                print("\n".join(result[1].lines()), flush=True)
            else:                        # a stale table is said even in --quiet runs (the report keeps it too)
                for warning in result[1].warnings:
                    print(f"warning: {warning}", file=sys.stderr, flush=True)
        if self.dist.enabled:
            result, _ = self.dist.agree(result)
        return result

    def _resize_to_slim(self, widths: dict[str, int], merged: bool = False) -> None:
        """The slim phase's network without a freeze (resume, start_slim): masks detached, each site cut
        to its first `widths` channels (`merged`: without its bypasses, as the freeze's merge
        left them), on the device and layout the step uses, a new optimizer over its parameters, no
        LAPP penalty. The caller loads weights and wraps it for distribution."""
        if self.controller is not None:
            self.controller.detach_masks()
        self.task = DenseTask()
        resize_to_widths(self.model, self.sites, widths)
        if merged:
            drop_bypass(self.model)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = self._make_optimizer()

    def start_slim(self, widths: dict[str, int], weights: dict[str, torch.Tensor] | None = None) -> None:
        """Skip the pruning phase: before the first epoch, give the network `widths` (one per site; each
        site keeps its first channels) and train it as it is from there (no masks, no penalty). For
        networks whose widths are chosen elsewhere: a uniformly thinned network trained from scratch, or
        one pruned by another method, whose `weights` (a state dict of those shapes) are then loaded.
        Needs a LAPP run (its sites) that has not started; a resumed run is rebuilt from its checkpoint.
        There is no freeze, so the bypass is not merged here (the bypass trains throughout)."""
        if self.controller is None or self.state.epoch != 0 or self.state.phase != "pruning":
            raise UserError("start_slim needs a LAPP run that has not started training")
        unknown = sorted(set(widths) - set(self.dense_widths))
        if unknown:
            raise UserError(f"start_slim: {self.config.model} has no prunable site(s) {unknown[:3]}")
        self._resize_to_slim(widths)
        if weights is not None:
            self.model.load_state_dict(weights)
        self.train_model = self.dist.wrap(self.model)
        self.state.phase = "slim"
        self.state.widths = {name: int(widths.get(name, total)) for name, total in self.dense_widths.items()}

    def run(self, resume: bool = False, on_epoch: Callable[["Trainer"], None] | None = None) -> dict[str, Any]:
        """Train to the end (or from the last checkpoint), write the slim model and the report;
        returns the report (see `training.report.build_report`)."""
        with self.run_dir.hold():
            if resume and self.run_dir.checkpoint_path.is_file():
                self.load_checkpoint()
            elif resume and not self.run_dir.config_path.is_file():
                raise UserError(f"nothing to resume: {self.out / CHECKPOINT} does not exist")
            # a new run, or one killed before its first checkpoint, starts from epoch 0; a resumed run's
            # config is written again because options given on resume (more --epochs) change it
            self.run_dir.write_config(asdict(self.config))
            while self.state.epoch < self.config.epochs:
                record = self.train_epoch()
                self.state.epoch += 1
                if self.state.phase == "pruning" and self.state.epoch >= self.config.prune_epochs:
                    self.freeze()
                record.flops_ratio = self.current_flops_ratio()
                if self.latency is not None:
                    record.latency_ratio = self.current_latency_ratio()
                record.test_top1 = self.evaluate()
                self.state.history.append(asdict(record))
                self.save_checkpoint()
                if self.show_progress:
                    print(f"epoch {record.epoch:3d} [{record.phase:7s}] {record.seconds:6.1f}s  loss {record.train_loss:.4f}  "
                          f"train {record.train_top1:.4f}  test {record.test_top1:.4f}  FLOPs {record.flops_ratio:.4f}"
                          + (f"  latency {record.latency_ratio:.4f}" if record.latency_ratio is not None else ""), flush=True)
                if on_epoch is not None:
                    on_epoch(self)
            self.write_slim_model()
            report = self.summary().build()
            if self.run_dir.writer:
                write_report(self.out, report, self.state)
            return report

    @property
    def _reparam(self) -> bool:
        return self.config.bypass and not self.config.dense and self.config.bypass_mode == "reparam"

    @property
    def _bypass_merged(self) -> bool:
        return bypass_merged_in(self.state)

    def summary(self) -> RunSummary:
        """What the run's report is built from (the report module knows nothing of the Trainer)."""
        return RunSummary(asdict(self.config), self.state, self.model, self.input_shape,
                          self.data.info.num_classes, dict(self.dense_widths), self.cost.name,
                          self.latency.shaped_for if self.latency else [],
                          predicted_ratios(self.latency, self.current_counts()) if self.latency else {})

    def architecture_spec(self) -> ArchitectureSpec:
        info = self.data.info
        return ArchitectureSpec(
            model=self.config.model, in_channels=info.in_channels, num_classes=info.num_classes,
            input_size=info.input_size,
            bypass=self.config.bypass and not self.config.dense and not self._reparam and not self._bypass_merged,
            widths=dict(self.state.widths), dense_widths=dict(self.dense_widths),
            mean=list(info.mean), std=list(info.std), class_names=list(info.class_names),
            coupled=self.config.coupled_groups and not self.config.dense,
        )

    def write_slim_model(self) -> None:
        """slim_model.pt and architecture.json (writer only). Bypass mode "reparam": saved baked (each
        bypass folded into its kxk kernel, exact), so the spec says no bypass."""
        model = bake(copy.deepcopy(self.model)) if self._reparam else self.model
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        self.run_dir.torch_save(SLIM_WEIGHTS, state)
        self.run_dir.write_json(SLIM_SPEC, self.architecture_spec().to_dict())


def run_training(config: TrainConfig, resume: bool = False, measure: Measure | None = None) -> dict[str, Any]:
    """Validate `config`, check the run directory (new, or resumable), train, and return the report.
    Raises UserError for every bad input before anything is written.

    Under torchrun (WORLD_SIZE > 1) every process runs this: the process group is set up from the
    environment (`distributed.setup_from_env`), every process checks the run directory before
    rank 0 writes anything in it, and the group is left at the end. `measure`: measures the freeze's
    width plan on a target in latency-constrained runs (`Trainer.measured_landing`; None: the table's plan)."""
    validate_config(config)
    dist = setup_from_env(resolve_device(config.device))
    try:
        RunDirectory(config.out, writer=dist.is_writer).check_usable(resume)
        dist.barrier()                   # distributed: nobody writes before every process has checked
        trainer = Trainer(config, dist=dist, measure=measure)
        if dist.is_writer:
            print("\n".join(trainer.decisions()), flush=True)
        return trainer.run(resume=resume)
    finally:
        dist.close()
