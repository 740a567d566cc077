"""The training configuration: one dataclass, the one source of every `lapp-edge train` flag.

Each field carries its help text (with units and allowed values) in its metadata; the CLI
(`lapp_edge.cli.flags.add_dataclass_arguments`) generates the flags from it, and a resumed
run reads the same fields back from its `config.json` (`config_from_saved`). An option is
written once: here.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lapp_edge.data.readers import DATASETS
from lapp_edge.errors import UserError

if TYPE_CHECKING:
    from lapp_edge.lapp.controller import LappConfig

LR_SCHEDULES = ("cosine", "step")
BYPASS_MODES = ("branch", "reparam")     # lapp_edge.models.reparam.BYPASS_MODES
DEVICES = ("auto", "cpu", "cuda")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None,
           cli: bool = True) -> Any:
    """A config field with its CLI help. `flag` overrides the generated flag name (a bool field
    whose flag starts with --no- or is --quiet stores False when given); `cli=False` keeps it off the CLI."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "cli": cli})


def _model_names() -> tuple[str, ...]:
    from lapp_edge.models import MODEL_BUILDERS

    return tuple(MODEL_BUILDERS)


def _scorer_names() -> tuple[str, ...]:
    from lapp_edge.lapp.scores import SCORERS

    return tuple(SCORERS)


@dataclass
class TrainConfig:
    """Everything that defines a training run (dense, or LAPP from scratch)."""

    out: str = field(metadata={"help": "run directory (must be new, unless --resume)", "required": True})
    model: str = option("resnet20", "model family", choices=_model_names())
    dataset: str = option("fashion-mnist", "dataset", choices=DATASETS)
    data_dir: str | None = option(None, "dataset directory (default: the dataset's standard place)")
    epochs: int = option(30, "training epochs in all (pruning phase included)")
    prune_epochs: int = option(3, "epochs of the LAPP pruning phase; then the network is slimmed and training goes on slim")
    flops_target: float = option(0.4, "kept share of the dense network's FLOPs, in (0, 1]; the slim network lands within +-1%%")
    channel_multiple: int = option(8, "kept widths are multiples of this (1: no rounding)")
    dense: bool = option(False, "train the dense baseline (no LAPP)")
    bypass: bool = option(True, "no 1x1 bypass branch on prunable convs", flag="--no-bypass")
    bypass_mode: str = option("branch", "how the 1x1 bypass trains: branch (its own conv + BN, two convs per unit) or "
                              "reparam (folded into the kxk kernel at every step: one conv, a linear scale instead of "
                              "its BN, OREPA-style; a different function, see docs/GPU.md)", choices=BYPASS_MODES)
    coupled_groups: bool = option(True, "prune only inner convs: leave residual-coupled channel groups (stage widths) at full width",
                                  flag="--no-groups")
    group_reduce: str = option("sum", "how a coupled group's channel score combines its producers' scores", choices=("sum", "max"))
    batch_size: int = option(128, "images per training batch")
    lr: float = option(0.1, "peak learning rate (SGD, Nesterov momentum)")
    momentum: float = option(0.9, "SGD momentum, in [0, 1)")
    weight_decay: float = option(5e-4, "L2 weight decay")
    lr_schedule: str = option("cosine", "learning-rate schedule over all steps", choices=LR_SCHEDULES)
    seed: int = option(0, "random seed (weights, shuffling, augmentation, subsets), in [0, 2^32)")
    train_subset: int = option(0, "train on a seeded random subset of this many images (0: all)")
    test_subset: int = option(0, "evaluate on a seeded random subset of this many test images (0: all)")
    device: str = option("auto", "training device (auto: cuda when available)", choices=DEVICES)
    threads: int = option(0, "CPU threads for torch (0: torch's default)")
    bn_recalibration_batches: int = option(40, "training batches used to re-estimate BN statistics at freeze")
    trace_every: int = option(10, "record every layer's kept width every N pruning steps (for the plot)")
    scorer: str = option("bn_weight_norm", "channel importance score", choices=_scorer_names())
    progress: bool = option(True, "no progress bars or per-epoch lines", flag="--quiet")

    def lapp_config(self) -> "LappConfig":
        """LAPP's settings for this run (the FLOPs target becomes the cost target)."""
        from lapp_edge.lapp.controller import LappConfig

        return LappConfig(
            target=self.flops_target, channel_multiple=self.channel_multiple, scorer=self.scorer,
            min_channels=max(1, self.channel_multiple), group_reduce=self.group_reduce,
        )


def defaults() -> dict[str, Any]:
    """Every field's default (the required `out` excluded)."""
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def validate_config(config: TrainConfig) -> None:
    """Reject bad settings before anything is written (UserError, one line naming the flag)."""
    from lapp_edge.lapp.scores import SCORERS
    from lapp_edge.models import MODEL_BUILDERS

    if config.model not in MODEL_BUILDERS:
        raise UserError(f"unknown model '{config.model}'; choose one of: {', '.join(MODEL_BUILDERS)}")
    if config.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{config.dataset}'; choose one of: {', '.join(DATASETS)}")
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
    if not (0 <= config.momentum < 1):
        raise UserError(f"--momentum must lie in [0, 1), got {config.momentum}")
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        raise UserError(f"--weight-decay must be a non-negative finite number, got {config.weight_decay}")
    if not 0 <= config.seed < 2**32:
        raise UserError(f"--seed must lie in [0, 2^32), got {config.seed}")
    if config.scorer not in SCORERS:
        raise UserError(f"unknown scorer '{config.scorer}'; choose one of: {', '.join(SCORERS)}")
    if config.group_reduce not in ("sum", "max"):
        raise UserError(f"--group-reduce must be sum or max, got '{config.group_reduce}'")
    if config.bypass_mode not in BYPASS_MODES:
        raise UserError(f"--bypass-mode must be branch or reparam, got '{config.bypass_mode}'")
    if config.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"--lr-schedule must be cosine or step, got '{config.lr_schedule}'")
    if config.train_subset < 0 or config.test_subset < 0:
        raise UserError("--train-subset and --test-subset must not be negative")
    if config.threads < 0:
        raise UserError(f"--threads must not be negative, got {config.threads}")
    if config.bn_recalibration_batches < 0:
        raise UserError(f"--bn-recalibration-batches must not be negative, got {config.bn_recalibration_batches}")
    if config.trace_every < 1:
        raise UserError(f"--trace-every must be at least 1, got {config.trace_every}")
    if config.device not in DEVICES:
        raise UserError(f"--device must be auto, cpu or cuda, got '{config.device}'")
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is available")


def config_from_saved(saved: object, path: Path) -> TrainConfig:
    """A TrainConfig from a run's config.json; wrong shapes or types are a UserError, not a
    traceback. Unknown keys (from other versions) are ignored; `out` is the file's directory."""
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a run configuration (a JSON object)")
    known = defaults()
    values: dict[str, Any] = {}
    for key, value in saved.items():
        if key not in known:
            continue
        default = known[key]
        if default is None:
            expected: tuple[type, ...] = (str, type(None))
        elif isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, float):
            expected = (int, float)
        else:
            expected = (type(default),)
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            raise UserError(f"{path}: '{key}' has the wrong type ({type(value).__name__}: {str(value)[:40]!r})")
        values[key] = value
    values["out"] = str(path.parent)
    values.setdefault("coupled_groups", False)     # runs saved before coupled groups existed pruned inner convs only
    return TrainConfig(**values)


# Options a resumed run takes from the command line instead of its saved config: how it runs,
# and how long (more epochs continue the schedule, which is a pure function of step and total).
RESUME_OVERRIDABLE = ("epochs", "data_dir", "device", "threads", "progress")


def merge_resume_options(saved: TrainConfig, given: dict[str, Any], completed_epochs: int | None = None) -> TrainConfig:
    """The saved config with the options given on a resume applied: those in RESUME_OVERRIDABLE
    are honoured; any other option that differs from the saved value is refused (UserError),
    never silently dropped."""
    values = {f.name: getattr(saved, f.name) for f in fields(TrainConfig)}
    for key, value in given.items():
        if key == "out" or values.get(key) == value:
            continue
        if key not in RESUME_OVERRIDABLE:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {value} differs from the run's saved {values[key]!r}; a resumed run keeps its "
                            f"settings except {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDABLE[:-1])}: "
                            "start a new run to change it")
        values[key] = value
    config = TrainConfig(**values)
    if completed_epochs is not None and config.epochs < completed_epochs:
        raise UserError(f"--epochs {config.epochs} is fewer than the {completed_epochs} epochs this run has already completed")
    return config
