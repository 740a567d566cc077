"""The training configuration: one dataclass, the one source of every `lapp-edge train` flag.

Each field carries its help text (with units and allowed values) in its metadata; the CLI
(`lapp_edge.cli.flags.add_dataclass_arguments`) generates the flags from it, and a resumed
run reads the same fields back from its `config.json` (`config_from_saved`). An option is
written once: here.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lapp_edge.data.imagefolder import AUGMENTATIONS
from lapp_edge.data.readers import DATASETS
from lapp_edge.errors import UserError
from lapp_edge.fileio import shown

if TYPE_CHECKING:
    from lapp_edge.lapp.controller import LappConfig

LR_SCHEDULES = ("cosine", "step")
BYPASS_MODES = ("branch", "reparam")     # lapp_edge.models.reparam.BYPASS_MODES
DEVICES = ("auto", "cpu", "cuda")
MEMORY_FORMATS = ("channels_last", "contiguous")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None,
           cli: bool = True, repeat: bool = False) -> Any:
    """A config field with its CLI help. `flag` overrides the generated flag name (a bool field
    whose flag starts with --no- or is --quiet stores False when given); `cli=False` keeps it off the CLI;
    `repeat`: a str field whose flag may be given several times (values joined with commas)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "cli": cli, "repeat": repeat})


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
    model: str = option("resnet20", "model: a registry name (" + ", ".join(_model_names()) + "), torchvision:<name> "
                        "(e.g. torchvision:mobilenet_v3_small) or module:function returning your nn.Module (docs/BYOM.md)")
    dataset: str = option("fashion-mnist", "dataset", choices=DATASETS)
    data_dir: str | None = option(None, "dataset directory (default: the dataset's standard place)")
    input_size: int = option(0, "side of the square input in pixels (0: from the data: fashion-mnist 28, cifar 32, "
                             "imagefolder the median shorter side of its images, at most 224); only imagefolder images are "
                             "resized (shorter side, then centre crop)")
    augment: str = option("auto", "training augmentation: small = zero-pad 1/8 of the side (fashion-mnist 2 px), random "
                          "crop, horizontal flip (CIFAR style); imagenet = random resized crop + flip (imagefolder only); "
                          "none; auto = small for inputs up to 64 px, imagenet above", choices=AUGMENTATIONS)
    mean: str = option("", "per-channel mean of pixels/255, comma-separated (empty: fashion-mnist/cifar the published "
                       "values, imagefolder computed from the training images)")
    std: str = option("", "per-channel standard deviation of pixels/255, comma-separated (empty: as --mean)")
    epochs: int = option(30, "training epochs in all (pruning phase included)")
    prune_epochs: int = option(3, "epochs of the LAPP pruning phase; then the network is slimmed and training goes on slim")
    flops_target: float = option(0.4, "kept share of the dense network's FLOPs, in (0, 1]; the slim network lands within +-1%%")
    channel_multiple: int = option(0, "kept widths are multiples of this (1: no rounding; 0: the --target profiles' "
                                   "multiple on this CPU, their least common multiple for several, else 8)")
    target: str = option("", "target profile to shape the network for (a name from lapp-edge targets, or a YAML path); "
                         "repeat for several. With --latency-target or --latency-budget-ms LAPP constrains the latency "
                         "each target's layer table predicts (lapp-edge profile-layers) instead of FLOPs", repeat=True)
    latency_target: str = option("", "kept share of the dense network's latency on each --target at --latency-batch, in "
                                 "(0, 1]: one value for all targets or one per target (repeat)", repeat=True)
    latency_budget_ms: str = option("", "latency budget in ms on each --target at --latency-batch, instead of "
                                    "--latency-target: one value for all targets or one per target (repeat)", repeat=True)
    max_flops: float = option(0.0, "with --latency-target / --latency-budget-ms: keep the FLOPs at most this share of the "
                              "dense network's as well, in (0, 1] (0: no FLOPs bound); both budgets hold, the tightest "
                              "binds. A FLOPs target and a speed floor at once: --max-flops 0.4 --latency-target 0.5 asks "
                              "0.8 of the FLOPs cut as measured speed")
    land_on_flops: bool = option(False, "with --max-flops: land the FLOPs on that share (as a FLOPs run does) and keep each "
                                 "latency budget as a ceiling, instead of stopping where the first budget binds: the "
                                 "same FLOPs, allocated so the latency fits (sites with the least latency per MAC grow); "
                                 "at freeze a plan measured over a ceiling is planned again, aimed 1%% under it")
    latency_batch: int = option(0, "batch size the latency constraint is for (0: the largest batch size of the target profile)")
    latency_table: str = option("", "layer latency table file per --target, in the same order (repeat; default: found in "
                                "latency-data/ or the shipped tables by target, model, input shape and this machine)",
                                repeat=True)
    measure_at_freeze: bool = option(True, "with a latency constraint, do not measure the freeze's width plan on each --target "
                                     "(by default it is measured as bench measures, and planned again against the table "
                                     "scaled by measured / predicted where it misses the budget by more than 2%%)",
                                     flag="--no-measure-at-freeze")
    dense: bool = option(False, "train the dense baseline (no LAPP)")
    bypass: bool = option(True, "no 1x1 bypass branch on prunable convs", flag="--no-bypass")
    bypass_mode: str = option("branch", "how the 1x1 bypass trains: branch (its own conv + BN, two convs per unit) or "
                              "reparam (folded into the kxk kernel at every step: one conv, a linear scale instead of "
                              "its BN, OREPA-style; a different function, see docs/GPU.md)", choices=BYPASS_MODES)
    merge_bypass_at_freeze: bool = option(True, "keep the 1x1 bypass through the slim phase (by default it is merged into its "
                                          "kxk conv at freeze, exact in eval mode, and the slim phase trains one conv per "
                                          "unit: a tenth or more off LAPP's training time at no measured accuracy cost; "
                                          "docs/RESULTS.md)", flag="--keep-bypass-after-freeze")
    coupled_groups: bool = option(True, "prune only inner convs: leave residual-coupled channel groups (stage widths) at full width",
                                  flag="--no-groups")
    group_reduce: str = option("sum", "how a coupled group's channel score combines its producers' scores", choices=("sum", "max"))
    max_pruning_ratio: float = option(1.0, "share of each prunable layer's (or coupled group's) channels LAPP may prune at "
                                      "most, in (0, 1]: every group keeps at least ceil((1 - R) * its channels), rounded up to "
                                      "the channel multiple (Torch-Pruning's max_pruning_ratio; 1: only one multiple kept). "
                                      "docs/RESULTS.md has what 0.75 did to latency-aware runs")
    block_removal: bool = option(False, "let LAPP prune a residual block's inner conv to zero channels, removing the block's "
                                 "branch (CIFAR ResNets, torchvision ResNet-18/34; MobileNetV2 blocks with an identity "
                                 "shortcut, through their expansion: removing blocks cuts per-layer costs that narrowing never does; "
                                 "docs/RESULTS.md has the measured speed)")
    keep_blocks: int = option(0, "with --block-removal: never remove the first N residual branches of each stage (depth "
                              "kept at every resolution; docs/RESULTS.md has what it buys in accuracy)")
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
    memory_format: str = option("channels_last", "activation and weight layout in training: channels_last (NHWC; on the CPU "
                                "faster or level for every family and phase measured, up to a third off an epoch: "
                                "make bench-memory-format) or contiguous (NCHW); CUDA training always uses channels_last",
                                choices=MEMORY_FORMATS)
    bn_recalibration_batches: int = option(40, "training batches used to re-estimate BN statistics at freeze")
    trace_every: int = option(10, "record every layer's kept width every N pruning steps (for the plot)")
    scorer: str = option("bn_weight_norm", "channel importance score", choices=_scorer_names())
    shared_threshold: bool = option(False, "ablation: one learned threshold shared by every prunable layer instead of one per layer")
    anneal_fraction: float = option(0.75, "share of the pruning phase over which the FLOPs target anneals from 1 to --flops-target, "
                                    "in [0, 1] (0: the final target from the first step on: no progressive schedule)")
    progress: bool = option(True, "no progress bars or per-epoch lines", flag="--quiet")

    @property
    def latency_constrained(self) -> bool:
        """LAPP constrains predicted latency (a --latency-target or --latency-budget-ms was given)."""
        return bool(self.latency_target or self.latency_budget_ms)

    def lapp_config(self, target: float | None = None) -> "LappConfig":
        """LAPP's settings for this run: the cost target is the FLOPs target, or `target` (the latency
        budget as a ratio of the dense latency, training/latency.py) when LAPP constrains latency."""
        from lapp_edge.lapp.controller import LappConfig

        multiple = self.channel_multiple or DEFAULT_CHANNEL_MULTIPLE
        return LappConfig(
            target=self.flops_target if target is None else target, channel_multiple=multiple, scorer=self.scorer,
            min_channels=max(1, multiple), group_reduce=self.group_reduce,
            shared_threshold=self.shared_threshold, anneal_fraction=self.anneal_fraction,
            block_removal=self.block_removal, keep_blocks=self.keep_blocks, max_pruning_ratio=self.max_pruning_ratio,
        )


DEFAULT_CHANNEL_MULTIPLE = 8       # without a target: 8 fp32 channels fill an AVX2 register (deploy/targets.py)


def split_values(text: str) -> list[str]:
    """The values of a repeatable option ("a,b" from --opt a --opt b)."""
    return [part.strip() for part in text.split(",") if part.strip()]


# Options only a LAPP run uses: a dense run given any of them (other than its default) is refused.
LAPP_ONLY = ("prune_epochs", "flops_target", "channel_multiple", "bn_recalibration_batches", "trace_every", "scorer",
             "target", "latency_target", "latency_budget_ms", "max_flops", "latency_batch", "latency_table", "shared_threshold",
             "anneal_fraction", "measure_at_freeze", "merge_bypass_at_freeze", "block_removal", "keep_blocks", "land_on_flops",
             "max_pruning_ratio")


def flag_name(name: str) -> str:
    """The command-line flag of TrainConfig field `name` (its metadata's `flag`, else --name-with-dashes)."""
    for item in fields(TrainConfig):
        if item.name == name:
            return item.metadata.get("flag") or "--" + name.replace("_", "-")
    return "--" + name.replace("_", "-")


def field_of_flag(word: str) -> tuple[str, Any] | None:
    """The TrainConfig field a command-line flag sets, and the value the bare flag gives it, for a
    word written as the flag without its dashes ("quiet", "no-bypass" or "no_bypass"): ("progress",
    False) for --quiet. None where the word is no renamed flag (a field's own name is not one)."""
    wanted = "--" + word.strip().lstrip("-").replace("_", "-")
    for item in fields(TrainConfig):
        flag = item.metadata.get("flag")
        if flag == wanted and flag != "--" + item.name.replace("_", "-"):
            return item.name, False if isinstance(item.default, bool) else None
    return None


def defaults() -> dict[str, Any]:
    """Every field's default (the required `out` excluded)."""
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def merges_bypass_at_freeze(config: TrainConfig) -> bool:
    """Whether the run's freeze merges its 1x1 bypasses into their convs (the default; `--keep-bypass-after-freeze`
    turns it off): only a LAPP run with a bypass has one to merge (`--dense` has no freeze, `--no-bypass` no bypass)."""
    return config.merge_bypass_at_freeze and config.bypass and not config.dense


def validate_config(config: TrainConfig) -> None:
    """Reject bad settings before anything is written (UserError, one line naming the flag)."""
    from lapp_edge.lapp.scores import SCORERS
    from lapp_edge.models import MODEL_BUILDERS

    if not str(config.out).strip():
        raise UserError("--out is empty: give a directory name")
    if ":" in config.model:     # torchvision:<name> or module:function (models/traced.py); imported, not yet called
        from lapp_edge.models.traced import resolve_builder

        resolve_builder(config.model)
    elif config.model not in MODEL_BUILDERS:
        raise UserError(f"unknown model '{config.model}'; choose one of: {', '.join(MODEL_BUILDERS)}, "
                        "or torchvision:<name>, or module:function")
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
    if config.channel_multiple < 0:
        raise UserError(f"--channel-multiple must be at least 1 (or 0: the target's), got {config.channel_multiple}")
    validate_latency_options(config)
    if not 0.0 < config.max_pruning_ratio <= 1.0:     # also refuses NaN
        raise UserError(f"--max-pruning-ratio must lie in (0, 1], got {config.max_pruning_ratio}")
    if not 0.0 <= config.anneal_fraction <= 1.0:
        raise UserError(f"--anneal-fraction must lie in [0, 1], got {config.anneal_fraction}")
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
    if merges_bypass_at_freeze(config) and config.bn_recalibration_batches < 1:
        raise UserError("merging the 1x1 bypass at freeze needs --bn-recalibration-batches >= 1 for the merged BN's "
                        "statistics; give one, or --keep-bypass-after-freeze")
    if config.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"--lr-schedule must be cosine or step, got '{config.lr_schedule}'")
    if config.input_size < 0:
        raise UserError(f"--input-size must not be negative (0: from the data), got {config.input_size}")
    if config.augment not in AUGMENTATIONS:
        raise UserError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got '{config.augment}'")
    for flag, text in (("--mean", config.mean), ("--std", config.std)):
        try:
            values = [float(part) for part in text.split(",")] if text else []
        except ValueError:
            raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
        if not all(math.isfinite(v) for v in values) or (flag == "--std" and any(v <= 0 for v in values)):
            raise UserError(f"{flag} values must be finite{' and positive' if flag == '--std' else ''}, got {text!r}")
    if config.train_subset < 0 or config.test_subset < 0:
        raise UserError("--train-subset and --test-subset must not be negative")
    if config.threads < 0:
        raise UserError(f"--threads must not be negative, got {config.threads}")
    if config.bn_recalibration_batches < 0:
        raise UserError(f"--bn-recalibration-batches must not be negative, got {config.bn_recalibration_batches}")
    if config.trace_every < 1:
        raise UserError(f"--trace-every must be at least 1, got {config.trace_every}")
    if config.memory_format not in MEMORY_FORMATS:
        raise UserError(f"--memory-format must be channels_last or contiguous, got '{config.memory_format}'")
    if config.device not in DEVICES:
        raise UserError(f"--device must be auto, cpu or cuda, got '{config.device}'")
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is available")


def validate_latency_options(config: TrainConfig) -> None:
    """The latency-constraint options agree with each other (UserError, one line naming the flag)."""
    targets = split_values(config.target)
    if config.latency_target and config.latency_budget_ms:
        raise UserError("give --latency-target or --latency-budget-ms, not both")
    if config.latency_constrained and not targets:
        raise UserError("--latency-target / --latency-budget-ms need --target PROFILE: latency is measured on a target")
    flag = "--latency-target" if config.latency_target else "--latency-budget-ms"
    for text in (config.latency_target, config.latency_budget_ms):
        if not text:
            continue
        try:
            values = [float(v) for v in split_values(text)]
        except ValueError:
            raise UserError(f"{flag} must be numbers, got {text!r}") from None
        if len(values) not in (1, len(targets)):
            raise UserError(f"{flag} takes one value for all targets or one per --target ({len(targets)}), got {len(values)}")
        if text is config.latency_target and not all(0.0 < v <= 1.0 for v in values):
            raise UserError(f"--latency-target must lie in (0, 1], got {text}")
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise UserError(f"{flag} must be positive, got {text}")
    if not (0.0 <= config.max_flops <= 1.0) or math.isnan(config.max_flops):
        raise UserError(f"--max-flops must lie in (0, 1] (0: no FLOPs bound), got {config.max_flops}")
    if config.max_flops and not config.latency_constrained:
        raise UserError("--max-flops bounds the FLOPs beside a latency budget (--latency-target / --latency-budget-ms); "
                        "without one use --flops-target")
    if config.keep_blocks < 0:
        raise UserError(f"--keep-blocks must not be negative, got {config.keep_blocks}")
    if config.keep_blocks and not config.block_removal:
        raise UserError("--keep-blocks says which residual branches --block-removal may not remove; give --block-removal")
    if config.land_on_flops and not config.max_flops:
        raise UserError("--land-on-flops lands the FLOPs on --max-flops under the latency budgets; give --max-flops")
    tables = split_values(config.latency_table)
    if tables and len(tables) != len(targets):
        raise UserError(f"--latency-table takes one file per --target ({len(targets)}), got {len(tables)}")
    if config.latency_batch < 0:
        raise UserError(f"--latency-batch must not be negative (0: the target's largest batch), got {config.latency_batch}")


def refuse_ignored_options(given: dict[str, Any]) -> None:
    """Options given (on the command line, or in a run-all config) that the run would not use are
    refused in one line, never silently dropped: LAPP-only options with --dense."""
    if ("latency_target" in given or "latency_budget_ms" in given) and "flops_target" in given:
        raise UserError("--flops-target and a latency constraint (--latency-target / --latency-budget-ms) exclude each "
                        "other: to bound the FLOPs beside a latency budget give --max-flops")
    if given.get("dense"):
        ignored = [flag_name(name) for name in LAPP_ONLY if name in given]
        if ignored:
            raise UserError(f"--dense trains without LAPP, so {', '.join(ignored)} would be ignored; drop "
                            f"{'it' if len(ignored) == 1 else 'them'} or train without --dense")


def config_from_saved(saved: object, path: Path) -> TrainConfig:
    """A TrainConfig from a run's config.json; wrong shapes, types or ranges are a UserError
    naming the file and the field, not a traceback. Unknown keys (from other versions) are
    ignored; `out` is the file's directory."""
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
            raise UserError(f"{path}: '{key}' has the wrong type ({type(value).__name__}: {shown(value, 40)})")
        if isinstance(value, str) and (len(value) > 4096 or not value.isprintable()):
            raise UserError(f"{path}: '{key}' must be a printable string of at most 4096 characters, not {shown(value, 40)}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
            raise UserError(f"{path}: '{key}' is out of range ({shown(value, 40)})")
        values[key] = value
    values["out"] = str(path.parent)
    values.setdefault("coupled_groups", False)     # runs saved before coupled groups existed pruned inner convs only
    values.setdefault("memory_format", "contiguous")    # runs saved before the option existed trained NCHW on the CPU
    values.setdefault("merge_bypass_at_freeze", False)  # runs saved before the merge existed kept the bypass after freeze
    config = TrainConfig(**values)
    try:   # ranges as for the flags; the device is checked when the resumed run starts (it may change)
        validate_config(replace(config, device="cpu"))
    except UserError as error:
        field_message = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: "'" + m.group(1).replace("-", "_") + "'", str(error))
        raise UserError(f"{path}: {field_message}") from None
    return config


# Options a resumed run takes from the command line instead of its saved config: how it runs,
# and how long (more epochs continue the schedule, which is a pure function of step and total).
RESUME_OVERRIDABLE = ("epochs", "data_dir", "device", "threads", "progress")


def merge_resume_options(saved: TrainConfig, given: dict[str, Any], completed_epochs: int | None = None) -> TrainConfig:
    """The saved config with the options given on a resume applied: those in RESUME_OVERRIDABLE
    are honoured; any other option that differs from the saved value is refused (UserError),
    never silently dropped. A run with no completed epoch (`completed_epochs` None: killed or
    refused before its first checkpoint) has trained nothing, so every given option is honoured."""
    values = {f.name: getattr(saved, f.name) for f in fields(TrainConfig)}
    refused = []
    for key, value in given.items():
        if key == "out" or values.get(key) == value:
            continue
        if key not in RESUME_OVERRIDABLE and completed_epochs is not None:
            shown = flag_name(key) if isinstance(value, bool) else f"{flag_name(key)} {value}"
            refused.append(f"{shown} (saved: {values[key]!r})")
            continue
        values[key] = value
    if refused:
        raise UserError(f"--resume keeps the run's saved settings, but {'; '.join(refused)} differ; only "
                        f"{', '.join(flag_name(k) for k in RESUME_OVERRIDABLE)} may change: start a new run to change the others")
    config = TrainConfig(**values)
    if completed_epochs is not None and config.epochs < completed_epochs:
        raise UserError(f"--epochs {config.epochs} is fewer than the {completed_epochs} epochs this run has already completed")
    return config
