"""Training: dense, or LAPP from scratch (prune progressively, freeze, slim, go on slim).

One epoch = one pass over the (optionally subsampled) training split. The run directory
gets an atomic checkpoint after every epoch, so a killed run loses at most one epoch and
`resume=True` continues it exactly (CPU, fixed seed: shuffling and augmentation draw from
a generator seeded per epoch, the learning rate is a pure function of the step).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lapp_edge.data import Dataset, batch_count, iterate_batches, load_dataset
from lapp_edge.errors import UserError
from lapp_edge.fileio import (
    DirectoryLock, atomic_torch_save, atomic_write_json, remove_stale_temporaries, safe_torch_load,
)
from lapp_edge.lapp.controller import FreezeResult, LappConfig, LappController
from lapp_edge.lapp.flops import build_flops_model
from lapp_edge.lapp.scores import SCORERS
from lapp_edge.lapp.slim import resize_to_widths
from lapp_edge.lapp.widths import allowed_widths
from lapp_edge.models import MODEL_BUILDERS, build_model, prunable_sites
from lapp_edge.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    out: str
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 30
    prune_epochs: int = 3
    flops_target: float = 0.4
    channel_multiple: int = 8
    dense: bool = False                # train without LAPP (a baseline)
    bypass: bool = True                # add the 1x1 bypass branch to every prunable conv
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"        # cosine | step
    seed: int = 0
    train_subset: int = 0              # 0 = the whole training split
    test_subset: int = 0
    device: str = "auto"               # auto | cpu | cuda
    threads: int = 0                   # torch intra-op threads; 0 = torch's default
    bn_recalibration_batches: int = 40
    trace_every: int = 10              # record kept widths every N pruning steps
    scorer: str = "bn_weight_norm"
    progress: bool = True

    def lapp_config(self) -> LappConfig:
        return LappConfig(
            flops_target=self.flops_target, channel_multiple=self.channel_multiple, scorer=self.scorer,
            min_channels=max(1, self.channel_multiple),
        )


@dataclass
class EpochRecord:
    epoch: int
    phase: str
    seconds: float                     # wall clock
    cpu_seconds: float                 # this process's CPU time (robust on a shared machine)
    train_loss: float
    train_top1: float
    test_top1: float
    flops_ratio: float
    lr: float


@dataclass
class RunState:
    """Everything a checkpoint restores (besides model and optimizer tensors)."""

    epoch: int = 0                     # completed epochs
    step: int = 0
    phase: str = "dense"               # dense | pruning | slim
    widths: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    trace_steps: list[int] = field(default_factory=list)
    trace_widths: list[list[int]] = field(default_factory=list)
    freeze: dict[str, Any] | None = None


def validate_config(config: TrainConfig) -> None:
    """Reject bad settings before anything is written."""
    if config.model not in MODEL_BUILDERS:
        raise UserError(f"unknown model '{config.model}'; choose one of: {', '.join(MODEL_BUILDERS)}")
    if config.epochs <= 0:
        raise UserError(f"--epochs must be a positive integer, got {config.epochs}")
    if not (0.0 < config.flops_target <= 1.0) or math.isnan(config.flops_target):
        raise UserError(f"--flops-target must lie in (0, 1], got {config.flops_target}")
    if not config.dense:
        if config.prune_epochs <= 0:
            raise UserError(f"--prune-epochs must be at least 1, got {config.prune_epochs}")
        if config.prune_epochs >= config.epochs:
            raise UserError(
                f"--prune-epochs ({config.prune_epochs}) must be smaller than --epochs ({config.epochs}): "
                "the slim network needs epochs to train after pruning"
            )
    if config.channel_multiple < 1:
        raise UserError(f"--channel-multiple must be at least 1, got {config.channel_multiple}")
    if config.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {config.batch_size}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise UserError(f"--lr must be a positive finite number, got {config.lr}")
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        raise UserError(f"--weight-decay must be a non-negative finite number, got {config.weight_decay}")
    if not 0 <= config.seed < 2**32:
        raise UserError(f"--seed must lie in [0, 2^32), got {config.seed}")
    if config.scorer not in SCORERS:
        raise UserError(f"unknown scorer '{config.scorer}'; choose one of: {', '.join(SCORERS)}")
    if config.lr_schedule not in ("cosine", "step"):
        raise UserError(f"--lr-schedule must be cosine or step, got '{config.lr_schedule}'")
    if config.train_subset < 0 or config.test_subset < 0:
        raise UserError("--train-subset and --test-subset must not be negative")
    if config.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got '{config.device}'")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    progress = step / max(1, total_steps)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (0.1 ** (int(progress >= 0.5) + int(progress >= 0.75)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Holds one run: model, optimizers, LAPP controller and run directory."""

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None) -> None:
        validate_config(config)
        self.config = config
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.data = dataset or load_dataset(config.dataset, config.data_dir)
        self.train_split = self.data.train
        if config.train_subset and hasattr(self.train_split, "subset"):
            self.train_split = self.train_split.subset(config.train_subset, config.seed)  # type: ignore[union-attr]
        self.test_split = self.data.test
        if config.test_subset and hasattr(self.test_split, "subset"):
            self.test_split = self.test_split.subset(config.test_subset, config.seed + 1)  # type: ignore[union-attr]
        info = self.data.info
        self.input_shape = (info.in_channels, info.input_size, info.input_size)
        self.steps_per_epoch = batch_count(self.train_split, config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.prune_steps = 0 if config.dense else config.prune_epochs * self.steps_per_epoch
        self.amp = self.device.type == "cuda"

        torch.manual_seed(config.seed)
        self.model = build_model(config.model, info.in_channels, info.num_classes, config.bypass and not config.dense)
        self.sites = prunable_sites(self.model)
        self.dense_widths = {site.name: site.channels for site in self.sites}
        self.flops = build_flops_model(self.model, self.sites, self.input_shape)
        self.model.to(self.device)
        if self.amp:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = self._make_optimizer()
        self.controller: LappController | None = None
        self.threshold_optimizer: torch.optim.Optimizer | None = None
        self.state = RunState(phase="dense" if config.dense else "pruning", widths=dict(self.dense_widths))
        if not config.dense:
            self._check_target_reachable()
            self._attach_controller()

    # --- construction ------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.model.parameters(), lr=self.config.lr, momentum=self.config.momentum,
            weight_decay=self.config.weight_decay, nesterov=True,
        )

    def _attach_controller(self) -> None:
        self.controller = LappController(self.sites, self.flops, self.config.lapp_config()).to(self.device)
        # Adam moves a threshold by about lr per step; short pruning phases need larger steps
        # to let thresholds cross the score range (~8 z units) within the phase.
        threshold_lr = max(self.controller.config.threshold_lr, 8.0 / max(1, self.prune_steps))
        self.threshold_optimizer = torch.optim.Adam([self.controller.thresholds], lr=threshold_lr, weight_decay=0.0)

    def _check_target_reachable(self) -> None:
        lapp = self.config.lapp_config()
        smallest = [int(allowed_widths(c, lapp.channel_multiple, lapp.min_channels)[0]) for c in self.flops.site_channels]
        floor = float(self.flops.ratio(torch.tensor(smallest, dtype=torch.float64)))
        if floor > self.config.flops_target + lapp.tolerance:
            raise UserError(
                f"FLOPs target {self.config.flops_target} cannot be reached: with every prunable layer of "
                f"{self.config.model} at its minimum width ({lapp.channel_multiple} channels) the network keeps "
                f"{floor:.3f} of its FLOPs"
            )

    # --- checkpointing -----------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "state": asdict(self.state),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict() if self.controller else None,
            "threshold_optimizer": self.threshold_optimizer.state_dict() if self.threshold_optimizer else None,
        }

    def save_checkpoint(self) -> None:
        atomic_torch_save(self.out / CHECKPOINT, self.checkpoint_payload())

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        payload = safe_torch_load(path)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"checkpoint {path} is not a lapp-edge checkpoint")
        try:
            state = RunState(**payload["state"])
            if state.phase == "slim":
                if self.controller is not None:
                    self.controller.detach_masks()
                self.controller, self.threshold_optimizer = None, None
                resize_to_widths(self.model, self.sites, state.widths)
                self.model.to(self.device)
                if self.amp:
                    self.model.to(memory_format=torch.channels_last)
                self.optimizer = self._make_optimizer()
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            if self.controller is not None and self.threshold_optimizer is not None:
                self.controller.load_state_dict(payload["controller"])
                self.threshold_optimizer.load_state_dict(payload["threshold_optimizer"])
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

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.amp:
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(images)
        return self.model(images)

    def train_epoch(self) -> EpochRecord:
        config = self.config
        epoch = self.state.epoch
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        self.model.train()
        pruning = self.state.phase == "pruning" and self.controller is not None
        started, cpu_started = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        lr = self._set_lr()
        ratio = 1.0 if self.state.phase == "dense" else self._current_ratio()
        batches = iterate_batches(self.train_split, self.data.info, config.batch_size, self.device, generator, train=True)
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs} [{self.state.phase}]",
                   disable=not config.progress, leave=False, dynamic_ncols=True)
        for batch_index, (images, labels) in enumerate(bar):
            lr = self._set_lr()
            if pruning:
                assert self.controller is not None and self.threshold_optimizer is not None
                self.controller.update_masks()
            logits = self._forward(images)
            loss = F.cross_entropy(logits.float(), labels)
            total = loss
            if pruning:
                target_now = self.controller.target_at(self.state.step, self.prune_steps)
                total = loss + self.controller.penalty(target_now)
            if not torch.isfinite(total):
                kept = (f"the last good checkpoint ({self.out / CHECKPOINT}, epoch {epoch}) was kept. Lower --lr and resume or restart"
                        if epoch > 0 else "no epoch had completed, so there is no checkpoint. Lower --lr and restart")
                raise UserError(f"training diverged: the loss became {total.item()} at epoch {epoch + 1}, step {self.state.step}; {kept}")
            self.optimizer.zero_grad(set_to_none=True)
            if pruning:
                self.threshold_optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            if pruning:
                self.threshold_optimizer.step()
                self.controller.clamp_thresholds()
                if self.state.step % config.trace_every == 0:
                    self.state.trace_steps.append(self.state.step)
                    self.state.trace_widths.append([int(k) for k in self.controller.kept.detach().round().tolist()])
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            self.state.step += 1
            if batch_index % 20 == 0 or batch_index == self.steps_per_epoch - 1:
                if pruning:
                    ratio = float(self.controller.flops_ratio().detach())
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}", flops=f"{ratio:.3f}")
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        return EpochRecord(epoch + 1, self.state.phase, seconds, cpu_seconds, loss_sum.item() / max(1, seen),
                           correct.item() / max(1, seen), float("nan"), ratio, lr)

    def _current_ratio(self) -> float:
        if self.controller is not None:
            return float(self.flops.ratio(torch.tensor(self.controller.hard_counts(), dtype=torch.float64)))
        widths = [self.state.widths[s] for s in self.dense_widths]
        return float(self.flops.ratio(torch.tensor(widths, dtype=torch.float64)))

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> float:
        model = model or self.model
        model.eval()
        if self.controller is not None and self.state.phase == "pruning":
            self.controller.update_masks(with_grad=False)
        correct, seen = 0, 0
        for images, labels in iterate_batches(self.test_split, self.data.info, 500, self.device):
            correct += int((self._forward(images).argmax(1) == labels).sum())
            seen += len(labels)
        return correct / max(1, seen)

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: int) -> None:
        """Re-estimate BN running statistics on training batches (cumulative average):
        statistics gathered while masks moved are stale once they are frozen."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved_momentum = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        self.model.train()
        generator = torch.Generator().manual_seed(self.config.seed + 7)
        batch_iter = iterate_batches(self.train_split, self.data.info, self.config.batch_size, self.device, generator, train=True)
        for index, (images, _) in enumerate(batch_iter):
            if index >= batches:
                break
            self._forward(images)
        for norm, momentum in zip(norms, saved_momentum):
            norm.momentum = momentum

    def freeze(self) -> FreezeResult:
        """End of the pruning phase: round widths, fix masks, slim physically, recalibrate BN."""
        assert self.controller is not None
        plan = self.controller.plan_freeze()
        if abs(plan.flops_ratio - self.config.flops_target) > self.controller.config.tolerance:
            raise UserError(
                f"FLOPs target {self.config.flops_target} was not reached: the closest network with widths that are "
                f"multiples of {self.config.channel_multiple} keeps {plan.flops_ratio:.4f} of the FLOPs"
            )
        self.controller.apply_final_masks(plan, self.optimizer)
        self.controller.slim(plan, self.optimizer)
        self.controller, self.threshold_optimizer = None, None
        if self.amp:
            self.model.to(memory_format=torch.channels_last)
        self.recalibrate_batchnorm(self.config.bn_recalibration_batches)
        self.state.phase = "slim"
        self.state.widths = dict(plan.widths)
        self.state.freeze = asdict(plan)
        return plan

    def run(self, resume: bool = False, on_epoch=None) -> dict[str, Any]:  # noqa: ANN001
        """Train to the end (or from the last checkpoint), write the slim model and report."""
        from lapp_edge.report import build_report, write_report

        with DirectoryLock(self.out):
            remove_stale_temporaries(self.out)  # left by a killed write; we hold the lock, so nobody is writing them
            if resume and (self.out / CHECKPOINT).is_file():
                self.load_checkpoint()
            elif resume and not (self.out / CONFIG).is_file():
                raise UserError(f"nothing to resume: {self.out / CHECKPOINT} does not exist")
            else:  # a new run, or one killed before its first checkpoint: start from epoch 0
                atomic_write_json(self.out / CONFIG, asdict(self.config))
            while self.state.epoch < self.config.epochs:
                record = self.train_epoch()
                self.state.epoch += 1
                if self.state.phase == "pruning" and self.state.epoch >= self.config.prune_epochs:
                    self.freeze()
                    record.flops_ratio = self._current_ratio()
                record.test_top1 = self.evaluate()
                self.state.history.append(asdict(record))
                self.save_checkpoint()
                if self.config.progress:
                    print(f"epoch {record.epoch:3d} [{record.phase:7s}] {record.seconds:6.1f}s  loss {record.train_loss:.4f}  "
                          f"train {record.train_top1:.4f}  test {record.test_top1:.4f}  FLOPs {record.flops_ratio:.4f}", flush=True)
                if on_epoch is not None:
                    on_epoch(self)
            self.write_slim_model()
            report = build_report(self)
            write_report(self.out, report, self.state)
            return report

    def architecture_spec(self) -> ArchitectureSpec:
        info = self.data.info
        return ArchitectureSpec(
            model=self.config.model, in_channels=info.in_channels, num_classes=info.num_classes,
            input_size=info.input_size, bypass=self.config.bypass and not self.config.dense,
            widths=dict(self.state.widths), dense_widths=dict(self.dense_widths),
            mean=list(info.mean), std=list(info.std), class_names=list(info.class_names),
        )

    def write_slim_model(self) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        atomic_torch_save(self.out / SLIM_WEIGHTS, state)
        atomic_write_json(self.out / SLIM_SPEC, self.architecture_spec().to_dict())


def prepare_run_directory(config: TrainConfig, resume: bool) -> None:
    """A new run needs an empty or absent --out; a resumed one needs its checkpoint."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if resume:
        # a run killed before its first checkpoint has only config.json: it restarts from epoch 0
        if not (out / CHECKPOINT).is_file() and not (out / CONFIG).is_file():
            raise UserError(f"nothing to resume: {out / CHECKPOINT} does not exist")
        return
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already holds files; pass --resume to continue that run or choose another --out")


def run_training(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    validate_config(config)
    prepare_run_directory(config, resume)
    trainer = Trainer(config)
    return trainer.run(resume=resume)
