"""`lapp-edge train`: flags (generated from TrainConfig) -> TrainConfig -> run_training -> report table."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lapp_edge.cli.flags import add_dataclass_arguments, given_options
from lapp_edge.errors import UserError


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    from lapp_edge.training.config import TrainConfig

    p = subparsers.add_parser("train", help="train a network (LAPP from scratch, or dense)",
                              description="Train a network: LAPP from scratch to a FLOPs target, or the dense baseline.")
    add_dataclass_arguments(p, TrainConfig)
    p.add_argument("--merge-bypass-at-freeze", dest="merge_bypass_alias", action="store_true", default=argparse.SUPPRESS,
                   help="the default since 2026-12-04 (kept so that older commands run): the bypass is merged at freeze")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (--epochs, --data-dir, --device, --threads, "
                        "--quiet may change; other options must match the saved run, else one line, exit 2; a run with no "
                        "completed epoch takes any option)")
    p.set_defaults(handler=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    from lapp_edge.training.config import TrainConfig, config_from_saved, merge_resume_options, refuse_ignored_options
    from lapp_edge.training.report import format_report
    from lapp_edge.training.run_dir import CONFIG, RunDirectory
    from lapp_edge.training.trainer import run_training

    given = train_options_given(args)
    refuse_ignored_options(given)
    if args.resume:
        path = Path(args.out) / CONFIG
        if not os.path.lexists(path):
            raise UserError(f"nothing to resume: {path} does not exist")
        saved = config_from_saved(RunDirectory(args.out, writer=False).read_config(), path)
        completed = _completed_epochs(Path(args.out))
        config = merge_resume_options(saved, given, completed)
        config.out = args.out  # the directory asked for, even if the run was moved or copied since
    else:
        config = TrainConfig(**given)
    from lapp_edge.cli.oneline import one_line_warnings
    from lapp_edge.models.traced import UnprunableLayersWarning
    from lapp_edge.training.distributed import is_main_process

    with one_line_warnings(UnprunableLayersWarning):     # a user model's unprunable layers, named in one line
        report = run_training(config, resume=args.resume, measure=freeze_measurer(config))
    if is_main_process():          # under torchrun every process returns the report; rank 0 prints it
        print(format_report(report))
    return 0


def train_options_given(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line, with the old `--merge-bypass-at-freeze` read as
    merge_bypass_at_freeze=True. UserError (one line) where it comes with `--keep-bypass-after-freeze`: the two
    ask for opposite things, and which one argparse kept would depend on their order."""
    from lapp_edge.training.config import TrainConfig

    given = given_options(args, TrainConfig)
    if getattr(args, "merge_bypass_alias", False):
        if given.get("merge_bypass_at_freeze") is False:
            raise UserError("--merge-bypass-at-freeze and --keep-bypass-after-freeze ask for opposite things: give one "
                            "(merging is the default)")
        given["merge_bypass_at_freeze"] = True
    return given


def targets_without_runtime(config: Any) -> dict[str, str]:
    """The budget's --target names (as given) whose runtime cannot run on this machine, each with why (a module
    not installed, no CUDA GPU): what the freeze's plan measurement (measure_at_freeze) needs. Here, on the CLI
    side, because the training side imports no runtime (tests/test_layout.py)."""
    from lapp_edge.deploy.backends import runtime_available
    from lapp_edge.deploy.targets import load_target
    from lapp_edge.training.config import split_values

    missing = {}
    for name in split_values(config.target):
        available, why = runtime_available(load_target(name).backend)
        if not available:
            missing[name] = why
    return missing


def freeze_measurer(config: Any) -> Any:
    """The `Measure` a run's freeze uses to measure its planned widths on each --target
    (training/landing.py): a `PlanMeasurer` for a latency-constrained LAPP run with measure_at_freeze,
    else None (the table alone). Every command that trains (train, run-all) takes it from here."""
    if config.latency_constrained and config.measure_at_freeze and not config.dense:
        from lapp_edge.latency.measure_plan import PlanMeasurer

        for name, why in targets_without_runtime(config).items():     # found now, not after the pruning phase
            raise UserError(f"--target {name}: the freeze measures its width plan there, but its runtime cannot run "
                            f"here ({why}); install it, or give --no-measure-at-freeze (the table alone)")
        return PlanMeasurer()
    return None


def _completed_epochs(out: Path) -> int | None:
    """Epochs already completed by the run in `out` (from its report or checkpoint), or None."""
    from lapp_edge.training.run_dir import RunDirectory

    run_dir = RunDirectory(out, writer=False)
    if not run_dir.checkpoint_path.is_file():
        return None
    state = run_dir.load_checkpoint().get("state")
    return int(state.get("epoch", 0)) if isinstance(state, dict) else None
