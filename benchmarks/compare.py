"""LAPP against peers at equal cost: Fashion-MNIST, ResNet-20, same FLOPs target, same epoch budget.

Methods (each at every FLOPs target and seed; `dense` once per seed, the reference):

  dense                  `lapp-edge train --dense`
  uniform                every prunable width scaled by one factor (rounded to the channel multiple,
                         landing on the target: `lapp.widths.uniform_widths`), trained from scratch
                         by the project's Trainer (`Trainer.start_slim`) for the whole budget
  tp-l1, tp-bn, tp-gn    Torch-Pruning (`torch_pruning`): a dense network trained for the first
                         --pretrain-epochs of the budget (tp-bn with network slimming's L1 penalty on
                         the BN scales, tp-gn with DepGraph's group-norm regularisation, both through
                         the pruner's own `regularize` before every optimizer step), pruned to the FLOPs
                         target (global ranking, iterative steps, round_to = the channel multiple,
                         FLOPs counted by the project's deployed-MACs counter), then fine-tuned for the
                         rest of the budget. The learning rate follows the same cosine schedule over the
                         whole budget as every other method (no restart at the fine-tune).
                         L1 magnitude: MagnitudePruner + MagnitudeImportance(p=1); BN scale:
                         BNScalePruner + BNScaleImportance; group norm: GroupNormPruner +
                         GroupMagnitudeImportance(p=2)
  lapp                   `lapp-edge train --flops-target T` (the 1x1 bypass merged into its conv at freeze, the
                         default since 2026-12-04: the slim phase trains one conv per unit)
  lapp-no-bypass         ... --no-bypass
  lapp-keep-bypass       ... --keep-bypass-after-freeze (the bypass trains through the slim phase too: LAPP as it
                         was until 2026-12-04, and named "lapp" in the results of that time; "lapp-merge-bypass"
                         was then today's "lapp"; not an ablation, a costlier variant)
  lapp-shared-threshold  ... --shared-threshold (one threshold for every layer)
  lapp-no-anneal         ... --anneal-fraction 0 (the final target from the first step: no progressive schedule)
  lapp-no-groups         ... --no-groups (inner convs only; stage widths stay full)
  lapp-efficient         (asked for by name) LAPP shaped for speed on the latency target (x86-ort-fp32): the
                         FLOPs landed on T (--max-flops T --land-on-flops) under a latency ceiling of
                         T / --min-efficiency of the dense latency as this machine's layer table predicts it,
                         residual branches removable but the first of each stage (--block-removal
                         --keep-blocks 1): the demo's shape with its ORT ceiling alone. Needs the target's
                         layer table for this machine (refused in one line before training otherwise)

Every method trains for --epochs epochs in all on the same data (lapp_edge.data: the seeded
--train-subset, the full test split), with the same optimizer and learning-rate schedule. Each run
is its own process (`nice`d by --nice, --threads torch threads), --jobs of them at a time (default 1;
a Torch-Pruning method's runs of one seed in order, since they share its pretraining). Re-running the same
command resumes: finished runs (report.json) are reused, unfinished ones resumed from their last
epoch (`lapp-edge train --resume`, or the Trainer's checkpoint for the uniform and Torch-Pruning
runs; a Torch-Pruning run's pruned network is saved atomically before its fine-tune starts).

Then each finished run is exported (`export_run`: fused, verified ONNX package) and measured on
ONNX Runtime CPU fp32 (profile x86-ort-fp32) at batch 32 through `deploy/compile.py`'s
`compile_runner`: its latency relative to the dense network of the same seed, interleaved in one
process with load checks, the median over --compiles fresh compiles of both
(`compile.ratio_over_compiles`). Results: results.json (per method, target, seed), results.md
(mean and spread over seeds; then, per FLOPs target, LAPP's margin over the best peer's mean, its paired
same-seed differences against each peer and its training time against dense, with issue 12's goals),
accuracy_vs_flops.png and accuracy_vs_latency.png in --out.

    python benchmarks/compare.py --flops-targets 0.3,0.5 --seeds 0,1 --out bench-results/compare
    python benchmarks/compare.py --flops-targets 0.5 --seeds 0 --epochs 3 --train-subset 5000  # small
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lapp_edge.child_processes import ChildProcesses, ChildrenStopped  # noqa: E402
from lapp_edge.fileio import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from lapp_vs_dense import train_command  # noqa: E402

REPORT = "report.json"
CHECKPOINT = "checkpoint.pt"
TP_METHODS = ("tp-l1", "tp-bn", "tp-gn")
LATENCY_TARGET = "x86-ort-fp32"
LATENCY_BATCH = 32
CHILDREN = ChildProcesses("compare")   # the training processes, stopped with this one (SIGTERM, SIGHUP, SIGINT)


@dataclass(frozen=True)
class Method:
    """One compared method: how its runs are made (`kind`) and its extra `lapp-edge train` flags."""

    name: str
    kind: str                       # dense | lapp | uniform | tp
    train_flags: tuple[str, ...] = ()
    description: str = ""
    shaped_for_speed: bool = False  # lapp: FLOPs landed on the target under a latency ceiling (lapp-efficient)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dense", "dense", ("--dense",), "dense reference"),
    Method("uniform", "uniform", (), "uniform widths, trained from scratch"),
    Method("tp-l1", "tp", (), "Torch-Pruning L1 magnitude, pretrain + prune + fine-tune"),
    Method("tp-bn", "tp", (), "Torch-Pruning BN scale (network slimming), sparse pretrain + prune + fine-tune"),
    Method("tp-gn", "tp", (), "Torch-Pruning group norm (DepGraph), sparse pretrain + prune + fine-tune"),
    Method("lapp", "lapp", (), "LAPP"),
    Method("lapp-no-bypass", "lapp", ("--no-bypass",), "LAPP without the 1x1 bypass"),
    Method("lapp-keep-bypass", "lapp", ("--keep-bypass-after-freeze",), "LAPP, bypass kept after freeze"),
    Method("lapp-shared-threshold", "lapp", ("--shared-threshold",), "LAPP, one threshold for all layers"),
    Method("lapp-no-anneal", "lapp", ("--anneal-fraction", "0"), "LAPP, final target from the first step"),
    Method("lapp-no-groups", "lapp", ("--no-groups",), "LAPP, inner convs only"),
    Method("lapp-efficient", "lapp", ("--block-removal", "--keep-blocks", "1"),
           "LAPP, FLOPs landed under an ORT fp32 latency ceiling", shaped_for_speed=True),
)}
DEFAULT_METHODS = tuple(name for name, method in METHODS.items() if not method.shaped_for_speed)


@dataclass(frozen=True)
class Job:
    """One training run: a method at a FLOPs target (None: dense) and a seed."""

    method: str
    target: float | None
    seed: int

    @property
    def label(self) -> str:
        return f"{self.method}" + ("" if self.target is None else f" @ {self.target:g}") + f" seed {self.seed}"

    def run_dir(self, out: Path) -> Path:
        where = out / "runs" / self.method
        return (where if self.target is None else where / f"t{self.target:g}") / f"s{self.seed}"


@dataclass
class RunResult:
    """One finished run. Times are sums over its training epochs (evaluation excluded); a Torch-Pruning
    run's include its pretraining epochs and the pruning."""

    method: str
    target: float | None
    seed: int
    top1: float
    flops_ratio: float
    params_ratio: float
    epochs: int
    train_wall_s: float
    train_cpu_s: float
    prune_s: float = 0.0
    latency_ratio: float | None = None       # ORT fp32 batch 32, this / dense of the same seed, interleaved
    latency_ms: float | None = None          # absolute median (drifts between processes; the ratio does not)
    latency_other_cpu: float | None = None   # other processes' share of the machine while the ratio was measured
    latency_flagged: bool | None = None      # the machine stayed loaded beyond the protocol's limit
    run_dir: str = ""


@dataclass
class Summary:
    """Mean and spread (sample standard deviation; 0 for one seed) over seeds of one method at one target."""

    method: str
    target: float | None
    seeds: int
    top1_mean: float
    top1_sd: float
    flops_ratio: float
    params_ratio: float
    latency_ratio: float | None
    latency_sd: float | None
    train_wall_s: float
    train_cpu_s: float
    wall_vs_dense: float | None               # mean train wall time / the dense runs' mean
    cpu_vs_dense: float | None                # the same for CPU time (steadier on a loaded machine)
    top1_vs_dense_points: float | None        # 100 x (top-1 - dense top-1), means


# --- the plan ----------------------------------------------------------------------------

def plan_jobs(methods: list[str], targets: list[float], seeds: list[int]) -> list[Job]:
    """Every run the benchmark needs, dense first (the reference), then per target and seed each method."""
    jobs = [Job("dense", None, seed) for seed in seeds if "dense" in methods]
    for target in targets:
        for seed in seeds:
            jobs += [Job(name, target, seed) for name in methods if name != "dense"]
    return jobs


def job_state(job: Job, out: Path) -> str:
    """done (its report exists), resume (a checkpoint exists) or new."""
    run = job.run_dir(out)
    if (run / REPORT).is_file():
        return "done"
    if (run / CHECKPOINT).is_file() or (job.method in TP_METHODS and pretrain_dir(out, job.method, job.seed).is_dir()):
        return "resume"
    return "new"


def pretrain_dir(out: Path, method: str, seed: int) -> Path:
    """The dense pretraining run of a Torch-Pruning method (shared by its targets)."""
    return out / "runs" / method / "pretrain" / f"s{seed}"


def prune_epochs_of(args: argparse.Namespace) -> int:
    return args.prune_epochs or max(1, round(args.epochs * 0.2))


def pretrain_epochs_of(args: argparse.Namespace) -> int:
    return args.pretrain_epochs or max(1, min(args.epochs - 1, round(args.epochs * 0.5)))


def latency_table_missing(args: argparse.Namespace) -> str:
    """What lapp-edge train would miss to shape a run for LATENCY_TARGET here (its layer table for this machine,
    the model and Fashion-MNIST's 1x28x28), or "" where nothing is missing."""
    from lapp_edge.training.config import TrainConfig
    from lapp_edge.training.latency import targets_without_table

    config = TrainConfig(out="", model=args.model, target=LATENCY_TARGET, latency_target="0.5")
    if not targets_without_table(config, (1, 28, 28)):
        return ""
    return (f"a layer table for {LATENCY_TARGET} / {args.model} / 1x28x28 on this machine: lapp-edge profile-layers --target "
            f"{LATENCY_TARGET} --model {args.model} --grid-multiple {args.channel_multiple} --block-removal makes one")


def common_settings(args: argparse.Namespace, seed: int) -> list[str]:
    settings = ["--model", args.model, "--dataset", "fashion-mnist", "--epochs", str(args.epochs),
                "--train-subset", str(args.train_subset), "--test-subset", str(args.test_subset), "--seed", str(seed),
                "--threads", str(args.threads), "--device", args.device, "--quiet"]
    return settings + (["--data-dir", args.data_dir] if args.data_dir else [])


def job_command(job: Job, args: argparse.Namespace) -> list[str]:
    """The command of one run: `lapp-edge train` (dense, LAPP and its ablations; resumed as lapp_vs_dense
    does), or this script's worker mode (uniform, Torch-Pruning)."""
    method = METHODS[job.method]
    out = Path(args.out)
    if method.kind in ("dense", "lapp"):
        settings = common_settings(args, job.seed)
        if method.kind == "lapp":
            settings += ["--prune-epochs", str(prune_epochs_of(args)), "--channel-multiple", str(args.channel_multiple)]
            if method.shaped_for_speed:
                assert job.target is not None
                settings += ["--max-flops", str(job.target), "--land-on-flops", "--target", LATENCY_TARGET,
                             "--latency-batch", str(LATENCY_BATCH), "--latency-target", f"{job.target / args.min_efficiency:.4f}"]
            else:
                settings += ["--flops-target", str(job.target)]
        return train_command(job.run_dir(out), [*settings, *method.train_flags])
    worker = [sys.executable, str(Path(__file__).resolve()), "--only", f"{job.method}:{job.target}:{job.seed}"]
    for flag in ("out", "model", "epochs", "train_subset", "test_subset", "threads", "device", "channel_multiple",
                 "prune_epochs", "pretrain_epochs", "data_dir"):
        value = getattr(args, flag)
        if value not in (None, ""):
            worker += ["--" + flag.replace("_", "-"), str(value)]
    return worker


# --- uniform and Torch-Pruning runs (worker mode, one process per run) --------------------

def slim_config(args: argparse.Namespace, job: Job, out: Path) -> Any:
    """The TrainConfig of a run that starts slim (uniform, Torch-Pruning): a LAPP run's sites (coupled
    groups), no bypass, the same data, optimizer and schedule as every other run."""
    from lapp_edge.training.config import TrainConfig

    assert job.target is not None
    return TrainConfig(
        out=str(out), model=args.model, dataset="fashion-mnist", data_dir=args.data_dir or None, epochs=args.epochs,
        prune_epochs=max(1, min(args.epochs - 1, pretrain_epochs_of(args) if job.method in TP_METHODS else prune_epochs_of(args))),
        flops_target=job.target, channel_multiple=args.channel_multiple, bypass=False, coupled_groups=True,
        train_subset=args.train_subset, test_subset=args.test_subset, seed=job.seed, threads=args.threads,
        device=args.device, progress=False,
    )


def fresh_weights(model_name: str, sites_widths: dict[str, int], in_channels: int, num_classes: int, seed: int) -> dict[str, Any]:
    """A network built at `sites_widths` and initialised as the family initialises (He-normal, fan-out),
    so a thinned network starts from its own initialisation, not a slice of the dense one."""
    import torch
    from torch import nn

    from lapp_edge.models import build_model, prunable_sites
    from lapp_edge.models.slicing import resize_to_widths

    torch.manual_seed(seed)
    model = build_model(model_name, in_channels, num_classes, False, True)
    resize_to_widths(model, prunable_sites(model), sites_widths)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model.state_dict()


def run_uniform(job: Job, args: argparse.Namespace) -> None:
    from lapp_edge.lapp.widths import uniform_widths
    from lapp_edge.training.trainer import Trainer

    out = job.run_dir(Path(args.out))
    config = slim_config(args, job, out)
    trainer = Trainer(config)
    if (out / CHECKPOINT).is_file():
        trainer.run(resume=True)
        return
    lapp = config.lapp_config()
    widths, ratio, factor = uniform_widths(trainer.cost, job.target, lapp.channel_multiple, lapp.min_channels,
                                           tolerance=lapp.tolerance)
    by_site = {site.name: int(w) for site, w in zip(trainer.sites, widths)}
    print(f"uniform: factor {factor:.3f}, FLOPs ratio {ratio:.4f}, widths {list(by_site.values())}", flush=True)
    info = trainer.data.info
    trainer.start_slim(by_site, fresh_weights(config.model, by_site, info.in_channels, info.num_classes, config.seed))
    trainer.run()


@dataclass
class PruneOutcome:
    """Where a Torch-Pruning prune landed: per-site widths, the deployed-MACs ratio, the pruning ratio found."""

    widths: dict[str, int]
    flops_ratio: float
    pruning_ratio: float
    seconds: float
    candidates: list[tuple[float, float]] = field(default_factory=list)   # (pruning ratio, FLOPs ratio) tried


def tp_pruner(method: str, model: Any, example: Any, pruning_ratio: float, round_to: int, steps: int) -> Any:
    """The Torch-Pruning pruner of a method (global ranking across groups, the classifier's outputs kept)."""
    import torch_pruning as tp

    common = dict(example_inputs=example, global_pruning=True, pruning_ratio=pruning_ratio, iterative_steps=steps,
                  round_to=round_to, ignored_layers=[model.fc])
    if method == "tp-l1":
        pruner_class = getattr(tp.pruner, "MagnitudePruner", tp.pruner.BasePruner)   # 1.6: an alias of BasePruner
        return pruner_class(model, importance=tp.importance.MagnitudeImportance(p=1), **common)
    if method == "tp-bn":
        return tp.pruner.BNScalePruner(model, importance=tp.importance.BNScaleImportance(), reg=1e-5, **common)
    if method == "tp-gn":
        return tp.pruner.GroupNormPruner(model, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=1e-4, **common)
    raise ValueError(f"not a Torch-Pruning method: {method}")


def site_widths(model: Any, coupled_sites: list[Any], reference: Any) -> dict[str, int]:
    """Each coupled site's width in `model` (a pruned copy of `reference`'s family): the output channels
    of the module at the site's first producer's path."""
    names = {id(module): name for name, module in reference.named_modules()}
    modules = dict(model.named_modules())
    return {site.name: int(modules[names[id(site.producer)]].conv.out_channels) for site in coupled_sites}


def tp_importance(method: str) -> Any:
    import torch_pruning as tp

    return {"tp-l1": lambda: tp.importance.MagnitudeImportance(p=1), "tp-bn": tp.importance.BNScaleImportance,
            "tp-gn": lambda: tp.importance.GroupMagnitudeImportance(p=2)}[method]()


def refine_to_target(method: str, model: Any, input_shape: tuple[int, int, int], dense_macs: float, target: float,
                     round_to: int, tolerance: float) -> tuple[Any, float, int]:
    """From a pruned network above the target, remove one block of `round_to` channels at a time until
    the deployed MACs reach the target: the block of lowest Torch-Pruning importance over every group
    (the method's importance, normalised per group as in its global ranking), unless removing it would
    land more than `tolerance` below the target and a less important-ranked block would not. The
    network closest to the target (ties: below) is kept. Returns (network, FLOPs ratio, blocks removed)."""
    import torch
    import torch_pruning as tp

    from lapp_edge.lapp.flops import count_deployed_macs

    importance = tp_importance(method)
    example = torch.zeros(1, *input_shape)
    current = copy.deepcopy(model)
    flops = count_deployed_macs(current, input_shape) / dense_macs
    best = (abs(flops - target), int(flops > target), copy.deepcopy(current), flops, 0)
    removed = 0

    def remove(network: Any, name: str, handler: Any, channels: list[int]) -> Any:
        trial = copy.deepcopy(network)
        graph = tp.DependencyGraph().build_dependency(trial, example_inputs=example)
        graph.get_pruning_group(dict(trial.named_modules())[name], handler, channels).prune()
        return trial

    while flops > target:
        graph = tp.DependencyGraph().build_dependency(current, example_inputs=example)
        names = {module: name for name, module in current.named_modules()}
        choices: list[tuple[float, str, Any, list[int]]] = []
        for group in graph.get_all_groups(ignored_layers=[current.fc], root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
            root, handler = group[0].dep.target.module, group[0].dep.handler
            channels = graph.get_out_channels(root)
            drop = channels % round_to or round_to
            scores = importance(group) if channels - drop >= round_to else None
            if scores is None:
                continue
            order = torch.argsort(scores)[:drop]
            choices.append((float(scores[order].mean()), names[root], handler, order.tolist()))
        if not choices:
            break
        choices.sort(key=lambda item: item[0])
        trial = trial_flops = None
        for _, name, handler, channels in choices:
            trial = remove(current, name, handler, channels)
            trial_flops = count_deployed_macs(trial, input_shape) / dense_macs
            if trial_flops >= target - tolerance:
                break
        else:                                      # every block overshoots: take the least important one
            trial = remove(current, choices[0][1], choices[0][2], choices[0][3])
            trial_flops = count_deployed_macs(trial, input_shape) / dense_macs
        assert trial is not None and trial_flops is not None
        current, flops, removed = trial, trial_flops, removed + 1
        key = (abs(flops - target), int(flops > target))
        if key < best[:2]:
            best = (*key, copy.deepcopy(current), flops, removed)
    return best[2], best[3], best[4]


def prune_to_target(method: str, model: Any, model_name: str, input_shape: tuple[int, int, int], target: float,
                    round_to: int, steps: int = 4, tolerance: float = 0.01,
                    search_iterations: int = 10) -> tuple[Any, PruneOutcome]:
    """Prune a copy of `model` (the project's dense `model_name`, any weights) with Torch-Pruning to
    `target` of its deployed MACs. First the method's pruner (global ranking, `steps` iterative steps,
    round_to) with its pruning ratio found by bisection: each candidate pruned from the unpruned
    weights; a candidate with a conv below `round_to` channels is unusable. Where the closest
    candidate misses the target by more than `tolerance` (one rounding step of a narrow group moves
    the FLOPs by several percent), the nearest candidate above the target is refined block by block
    (`refine_to_target`). Returns the pruned copy and where it landed."""
    import torch

    from lapp_edge.lapp.flops import count_deployed_macs
    from lapp_edge.models import build_model, prunable_sites

    started = time.perf_counter()
    dense_macs = count_deployed_macs(model, input_shape)
    example = torch.zeros(1, *input_shape)
    smallest_dense = min(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    def attempt(ratio: float) -> tuple[Any, float | None]:
        candidate = copy.deepcopy(model).eval()
        pruner = tp_pruner(method, candidate, example, ratio, round_to, steps)
        for _ in range(steps):
            pruner.step()
        kept = min(m.out_channels for m in candidate.modules() if isinstance(m, torch.nn.Conv2d))
        if kept < min(round_to, smallest_dense):
            return candidate, None                 # a group pruned below one multiple: not a usable network
        return candidate, count_deployed_macs(candidate, input_shape) / dense_macs

    tried: list[tuple[float, float]] = []
    best: tuple[tuple[float, int], Any, float] | None = None      # ((distance, above), model, pruning ratio)
    above: tuple[float, Any] = (1.0, copy.deepcopy(model).eval())  # the candidate nearest above the target
    low, high = 0.0, 0.95
    for _ in range(search_iterations):
        middle = (low + high) / 2
        candidate, flops = attempt(middle)
        tried.append((middle, -1.0 if flops is None else flops))
        if flops is not None:
            key = (abs(flops - target), int(flops > target))
            if best is None or key < best[0]:
                best = (key, candidate, middle)
            if target < flops < above[0]:
                above = (flops, candidate)
        if flops is not None and flops > target:
            low = middle
        else:
            high = middle
        if best is not None and best[0][0] <= tolerance / 2:
            break
    if best is None or best[0][0] > tolerance:
        refined, flops, blocks = refine_to_target(method, above[1], input_shape, dense_macs, target, round_to, tolerance)
        if best is None or abs(flops - target) < best[0][0]:
            best = ((abs(flops - target), int(flops > target)), refined, -float(blocks))
    assert best is not None
    _, pruned, ratio = best
    coupled = build_model(model_name, input_shape[0], model.fc.out_features, False, True)
    widths = site_widths(pruned, prunable_sites(coupled), coupled)
    flops = count_deployed_macs(pruned, input_shape) / dense_macs
    return pruned, PruneOutcome(widths, flops, ratio, time.perf_counter() - started, tried)


class _Stop(Exception):
    """Raised by the pretraining's epoch callback once the pretraining share of the budget is done."""


def sparsity_regularizer(method: str, model: Any, input_shape: tuple[int, int, int]) -> Callable[[], None] | None:
    """The method's sparse-training step (the pruner's own `regularize`, applied to the gradients before
    each optimizer step): network slimming's L1 on BN scales (tp-bn), DepGraph's group-norm (tp-gn).
    The example input that Torch-Pruning traces is made on the model's device (the model trains on the
    GPU there: a CPU example failed every tp-bn/tp-gn run on a GPU)."""
    import torch

    if method == "tp-l1":
        return None
    example = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    pruner = tp_pruner(method, model, example, 0.5, 8, 1)
    return lambda: pruner.regularize(model)


def pretrain(job: Job, args: argparse.Namespace) -> Path:
    """The dense pretraining of a Torch-Pruning method: the first --pretrain-epochs of a dense run whose
    schedule spans the whole budget (the fine-tune continues it), with the method's sparsity
    regularisation. Resumed from its checkpoint; returns the run directory."""
    from lapp_edge.training.config import TrainConfig
    from lapp_edge.training.run_dir import RunDirectory
    from lapp_edge.training.trainer import Trainer

    out = pretrain_dir(Path(args.out), job.method, job.seed)
    epochs = pretrain_epochs_of(args)
    if (out / CHECKPOINT).is_file() and RunDirectory(out).load_checkpoint()["state"]["epoch"] >= epochs:
        return out
    config = TrainConfig(out=str(out), model=args.model, dataset="fashion-mnist", data_dir=args.data_dir or None,
                         epochs=args.epochs, dense=True, train_subset=args.train_subset, test_subset=args.test_subset,
                         seed=job.seed, threads=args.threads, device=args.device, progress=False)
    trainer = Trainer(config)
    regularize = sparsity_regularizer(job.method, trainer.model, trainer.input_shape)
    if regularize is not None:
        step = trainer.optimizer.step

        def regularized_step(*a: Any, **k: Any) -> Any:
            regularize()
            return step(*a, **k)

        trainer.optimizer.step = regularized_step      # type: ignore[method-assign]

    def stop(current: Any) -> None:
        if current.state.epoch >= epochs:
            raise _Stop

    try:
        trainer.run(resume=(out / CHECKPOINT).is_file(), on_epoch=stop)
    except _Stop:
        pass
    return out


def run_torch_pruning(job: Job, args: argparse.Namespace) -> None:
    """Pretrain (dense, sparse for tp-bn/tp-gn), prune to the target with Torch-Pruning, fine-tune for the
    rest of the budget with the project's Trainer; the pruned network is saved atomically first."""
    from lapp_edge.models import build_model
    from lapp_edge.torch_io import atomic_torch_save, safe_torch_load
    from lapp_edge.training.run_dir import RunDirectory
    from lapp_edge.training.trainer import Trainer

    assert job.target is not None
    out = job.run_dir(Path(args.out))
    config = slim_config(args, job, out)
    if (out / CHECKPOINT).is_file():
        Trainer(config).run(resume=True)
        return
    source = pretrain(job, args)
    prune_dir = out.with_name(out.name + ".prune")
    trainer = Trainer(config)
    if not (prune_dir / "prune.json").is_file():
        payload = RunDirectory(source).load_checkpoint()
        info = trainer.data.info
        dense = build_model(args.model, info.in_channels, info.num_classes, False, False)
        dense.load_state_dict(payload["model"])
        print(f"{job.method}: pruning to FLOPs {job.target} ...", flush=True)
        pruned, outcome = prune_to_target(job.method, dense, args.model, trainer.input_shape, job.target,
                                          args.channel_multiple)
        prune_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(prune_dir / "pruned.pt", {k: v.detach().clone() for k, v in pruned.state_dict().items()})
        atomic_write_json(prune_dir / "prune.json", {**asdict(outcome), "history": payload["state"]["history"],
                                                     "step": payload["state"]["step"]})
        print(f"{job.method}: FLOPs ratio {outcome.flops_ratio:.4f} in {outcome.seconds:.1f} s, widths "
              f"{list(outcome.widths.values())}", flush=True)
    record = read_json(prune_dir / "prune.json")
    weights = safe_torch_load(prune_dir / "pruned.pt")
    trainer.start_slim({k: int(v) for k, v in record["widths"].items()}, weights)
    pretrained = record["history"]
    trainer.state.epoch = len(pretrained)
    trainer.state.step = int(record["step"])
    trainer.state.history = list(pretrained)
    trainer.run()


def run_worker(spec: str, args: argparse.Namespace) -> int:
    """Worker mode (`--only METHOD:TARGET:SEED`): one uniform or Torch-Pruning run in this process."""
    import torch

    method, target, seed = spec.split(":")
    job = Job(method, float(target), int(seed))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if METHODS[method].kind == "uniform":
        run_uniform(job, args)
    else:
        run_torch_pruning(job, args)
    return 0


# --- results -------------------------------------------------------------------------------

def result_of(job: Job, out: Path) -> RunResult:
    """A finished run's figures from its report (and, for Torch-Pruning, its prune record)."""
    run = job.run_dir(out)
    report = read_json(run / REPORT)
    epochs = report["epochs"]
    prune_s = 0.0
    prune_record = run.with_name(run.name + ".prune") / "prune.json"
    if prune_record.is_file():
        prune_s = float(read_json(prune_record)["seconds"])
    # LAPP's freeze (BN re-estimation, a bypass merge) runs between epochs; reports before it was recorded lack it
    freeze = report.get("freeze_seconds") or {"wall": 0.0, "cpu": 0.0}
    return RunResult(
        method=job.method, target=job.target, seed=job.seed, top1=float(report["accuracy"]["test_top1"]),
        flops_ratio=float(report["flops"]["ratio"]), params_ratio=report["params"]["slim"] / report["params"]["dense"],
        epochs=len(epochs), train_wall_s=sum(e["seconds"] for e in epochs) + prune_s + freeze["wall"],
        train_cpu_s=sum(e["cpu_seconds"] for e in epochs) + prune_s + freeze["cpu"], prune_s=prune_s, run_dir=str(run),
    )


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[RunResult]) -> list[Summary]:
    """Mean and spread over seeds per (method, target); dense (target None) is the reference of every target."""
    dense = [r for r in results if r.method == "dense"]
    dense_top1 = statistics.mean(r.top1 for r in dense) if dense else None
    dense_wall = statistics.mean(r.train_wall_s for r in dense) if dense else None
    dense_cpu = statistics.mean(r.train_cpu_s for r in dense) if dense else None
    keys = sorted({(r.method, r.target) for r in results},
                  key=lambda k: (-1.0 if k[1] is None else k[1], list(METHODS).index(k[0]) if k[0] in METHODS else 99, k[0]))
    summaries = []
    for method, target in keys:
        rows = [r for r in results if r.method == method and r.target == target]
        top1 = [r.top1 for r in rows]
        latency = [r.latency_ratio for r in rows if r.latency_ratio is not None]
        wall, cpu = statistics.mean(r.train_wall_s for r in rows), statistics.mean(r.train_cpu_s for r in rows)
        summaries.append(Summary(
            method=method, target=target, seeds=len(rows), top1_mean=statistics.mean(top1), top1_sd=_sd(top1),
            flops_ratio=statistics.mean(r.flops_ratio for r in rows), params_ratio=statistics.mean(r.params_ratio for r in rows),
            latency_ratio=statistics.mean(latency) if latency else None, latency_sd=_sd(latency) if latency else None,
            train_wall_s=wall, train_cpu_s=cpu, wall_vs_dense=wall / dense_wall if dense_wall else None,
            cpu_vs_dense=cpu / dense_cpu if dense_cpu else None,
            top1_vs_dense_points=100 * (statistics.mean(top1) - dense_top1) if dense_top1 is not None else None,
        ))
    return summaries


def markdown_table(summaries: list[Summary]) -> str:
    """The results as a markdown table: top-1 mean ± sd over seeds, the cost figures, training time."""
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| method | FLOPs target | seeds | top-1 % (mean ± sd) | vs dense (points) | FLOPs ratio | params ratio "
             "| latency ratio b32 (± sd) | train wall s | train CPU s | wall / dense | CPU / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        latency = "-" if s.latency_ratio is None else f"{s.latency_ratio:.3f} ± {s.latency_sd or 0:.3f}"
        lines.append(
            f"| {s.method} | {'-' if s.target is None else f'{s.target:g}'} | {s.seeds} | {100 * s.top1_mean:.2f} ± "
            f"{100 * s.top1_sd:.2f} | {num(s.top1_vs_dense_points, '+.2f')} | {s.flops_ratio:.3f} | {s.params_ratio:.3f} "
            f"| {latency} | {s.train_wall_s:.0f} | {s.train_cpu_s:.0f} | {num(s.wall_vs_dense, '.2f')} "
            f"| {num(s.cpu_vs_dense, '.2f')} |")
    return "\n".join(lines)


PEER_KINDS = ("uniform", "tp")
GOAL_MARGIN_POINTS = 0.3          # issue 12: LAPP >= the best peer by 0.3 points (mean of seeds)
GOAL_CPU_VS_DENSE = 0.7           # issue 12: LAPP's total training time <= 0.7 x the dense run's


@dataclass
class GoalCheck:
    """LAPP (the default method) against its peers at one FLOPs target: the margin over the best peer's
    mean, the paired (same-seed) differences against each peer, and its training time against dense."""

    target: float
    best_peer: str
    best_peer_top1: float
    lapp_top1: float
    margin_points: float                      # 100 x (LAPP mean - best peer mean)
    paired_points: dict[str, list[float]]     # peer -> 100 x (LAPP - peer) per seed both ran, in seed order
    lapp_seeds: int
    best_peer_seeds: int                      # where it differs from lapp_seeds the means cover other seeds: flagged
    cpu_vs_dense: float | None
    accuracy_goal_met: bool
    time_goal_met: bool | None


def goal_checks(results: list[RunResult], summaries: list[Summary]) -> list[GoalCheck]:
    """One GoalCheck per FLOPs target where "lapp" and at least one peer (uniform, tp-*) finished."""
    checks = []
    for target in sorted({r.target for r in results if r.target is not None}):
        lapp = next((s for s in summaries if s.method == "lapp" and s.target == target), None)
        peers = [s for s in summaries if s.target == target and s.method in METHODS and METHODS[s.method].kind in PEER_KINDS]
        if lapp is None or not peers:
            continue
        best = max(peers, key=lambda s: s.top1_mean)
        lapp_by_seed = {r.seed: r.top1 for r in results if r.method == "lapp" and r.target == target}
        paired = {peer.method: [100 * (lapp_by_seed[r.seed] - r.top1)
                                for r in sorted(results, key=lambda r: r.seed)
                                if r.method == peer.method and r.target == target and r.seed in lapp_by_seed]
                  for peer in peers}
        margin = 100 * (lapp.top1_mean - best.top1_mean)
        # rounded before comparing: a margin of exactly 0.3 points must not read "not met" by a float's last bit
        checks.append(GoalCheck(target, best.method, best.top1_mean, lapp.top1_mean, margin, paired, lapp.seeds, best.seeds,
                                lapp.cpu_vs_dense, round(margin, 6) >= GOAL_MARGIN_POINTS,
                                None if lapp.cpu_vs_dense is None else round(lapp.cpu_vs_dense, 6) <= GOAL_CPU_VS_DENSE))
    return checks


def goals_table(checks: list[GoalCheck]) -> str:
    """The goal checks as markdown: margin over the best peer, paired differences (mean, sd, per seed), time."""
    lines = [f"| FLOPs target | best peer (top-1 %) | LAPP top-1 % | LAPP - best peer (goal >= {GOAL_MARGIN_POINTS}) "
             f"| paired LAPP - peer, per seed: mean (sd) | LAPP CPU / dense (goal <= {GOAL_CPU_VS_DENSE}) |",
             "|---|---|---|---|---|---|"]
    for c in checks:
        paired = "; ".join(f"{peer} {statistics.mean(d):+.2f} ({_sd(d):.2f}): " + ", ".join(f"{x:+.2f}" for x in d)
                           for peer, d in c.paired_points.items() if d)
        time = "-" if c.cpu_vs_dense is None else f"{c.cpu_vs_dense:.2f} ({'met' if c.time_goal_met else 'not met'})"
        seeds = "" if c.lapp_seeds == c.best_peer_seeds else f" [LAPP over {c.lapp_seeds} seeds, {c.best_peer} over {c.best_peer_seeds}]"
        lines.append(f"| {c.target:g} | {c.best_peer} ({100 * c.best_peer_top1:.2f}) | {100 * c.lapp_top1:.2f}{seeds} "
                     f"| {c.margin_points:+.2f} ({'met' if c.accuracy_goal_met else 'not met'}) | {paired} | {time} |")
    return "\n".join(lines)


@dataclass
class VariantCheck:
    """A LAPP variant (an ablation, or a cheaper way to train it) against LAPP at one FLOPs target,
    paired by seed: what it costs or gains in top-1 and in training CPU time."""

    method: str
    target: float
    paired_points: list[float]                # 100 x (variant - LAPP) per seed both ran, in seed order
    seeds: list[int]
    cpu_vs_lapp: list[float]                  # variant's training CPU s / LAPP's, per seed
    cpu_vs_dense: float | None                # over the seeds paired: the variant's mean CPU s / the dense runs' mean


def paired_cpu_vs_dense(rows: list[RunResult], dense_cpu_s: dict[int, float]) -> float | None:
    """Mean training CPU seconds of `rows` over the mean of the dense runs of the same seeds (None without any)."""
    paired = [r for r in rows if r.seed in dense_cpu_s]
    if not paired:
        return None
    return statistics.mean(r.train_cpu_s for r in paired) / statistics.mean(dense_cpu_s[r.seed] for r in paired)


def variant_checks(results: list[RunResult], summaries: list[Summary]) -> list[VariantCheck]:
    """One VariantCheck per LAPP variant and FLOPs target where it and "lapp" share a seed."""
    checks = []
    lapp = {(r.target, r.seed): r for r in results if r.method == "lapp"}
    dense = {r.seed: r.train_cpu_s for r in results if r.method == "dense"}
    for summary in summaries:
        if summary.method == "lapp" or summary.method not in METHODS or METHODS[summary.method].kind != "lapp":
            continue
        rows = sorted((r for r in results if r.method == summary.method and r.target == summary.target
                       and (r.target, r.seed) in lapp), key=lambda r: r.seed)
        if rows and summary.target is not None:
            checks.append(VariantCheck(
                summary.method, summary.target, [100 * (r.top1 - lapp[(r.target, r.seed)].top1) for r in rows],
                [r.seed for r in rows], [r.train_cpu_s / lapp[(r.target, r.seed)].train_cpu_s for r in rows],
                paired_cpu_vs_dense(rows, dense)))
    return checks


def variants_table(checks: list[VariantCheck]) -> str:
    """The variant checks as markdown: paired top-1 difference and CPU time against LAPP, per seed."""
    lines = ["| variant | FLOPs target | seeds | variant - LAPP, top-1 points: mean (sd): per seed | CPU / LAPP's, mean: per seed "
             "| CPU / dense (same seeds) |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.method} | {c.target:g} | {len(c.seeds)} | {statistics.mean(c.paired_points):+.2f} "
                     f"({_sd(c.paired_points):.2f}): " + ", ".join(f"{x:+.2f}" for x in c.paired_points)
                     + f" | {statistics.mean(c.cpu_vs_lapp):.2f}: " + ", ".join(f"{x:.2f}" for x in c.cpu_vs_lapp)
                     + f" | {'-' if c.cpu_vs_dense is None else format(c.cpu_vs_dense, '.2f')} |")
    return "\n".join(lines)


def plot(summaries: list[Summary], out: Path) -> list[Path]:
    """accuracy_vs_flops.png and accuracy_vs_latency.png (mean over seeds, bars: sd; latency where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_name, x_of, label in (("flops", lambda s: s.flops_ratio, "FLOPs ratio (deployed MACs / dense)"),
                                ("latency", lambda s: s.latency_ratio, "ONNX Runtime fp32 latency, batch 32 (ratio to dense)")):
        if all(x_of(s) is None for s in summaries):      # latency not measured (--no-latency)
            continue
        figure, axes = plt.subplots(figsize=(7.5, 5))
        methods = list(dict.fromkeys(s.method for s in summaries))
        cmap = plt.get_cmap("tab10")
        for index, method in enumerate(methods):
            rows = [s for s in summaries if s.method == method and x_of(s) is not None]
            if not rows:
                continue
            axes.errorbar([x_of(s) for s in rows], [100 * s.top1_mean for s in rows], yerr=[100 * s.top1_sd for s in rows],
                          fmt="*" if method == "dense" else ("o" if method.startswith("lapp") else "s"),
                          color=cmap(index % 10), label=method, capsize=3, markersize=8 if method == "dense" else 6)
        axes.set_xlabel(label)
        axes.set_ylabel("test top-1 (%)")
        axes.set_title("ResNet-20 on Fashion-MNIST: LAPP vs peers at equal cost and epochs")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = out / f"accuracy_vs_{x_name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


# --- latency (ONNX Runtime fp32, batch 32, against the dense run of the same seed) -------------

def compiles_measured(cache: dict[str, Any], run_dir: str) -> int:
    """How many fresh compiles the cached latency of `run_dir` was measured over: 0 when not measured,
    1 for entries written before the count was recorded (they measured one compile)."""
    entry = cache.get(run_dir)
    return 0 if entry is None else int(entry.get("compiles", 1))


def measure_latencies(results: list[RunResult], out: Path, data_dir: str | None, compiles: int = 3) -> None:
    """Export every finished run (verified package under out/packages) and measure its latency ratio to
    the dense run of its seed, interleaved in this process: the median over `compiles` fresh compiles
    of both (`compile.ratio_over_compiles`; one compile's ratio moves by a few percent, docs/RESULTS.md).
    Cached in out/latency.json (resumable); an entry measured over fewer compiles is measured again."""
    import numpy as np

    from lapp_edge.deploy.compile import compile_runner, ratio_over_compiles
    from lapp_edge.deploy.measure import LatencyProtocol, RatioProtocol, measure_latency
    from lapp_edge.deploy.package import load_package
    from lapp_edge.deploy.targets import load_target
    from lapp_edge.export.package_writer import export_run

    cache_path = out / "latency.json"
    cache: dict[str, Any] = read_json(cache_path) if cache_path.is_file() else {}
    profile = load_target(LATENCY_TARGET)
    data = np.random.default_rng(0).standard_normal((LATENCY_BATCH, *profile.input_shape)).astype(np.float32)
    protocol = RatioProtocol(retries=1)

    def package(result: RunResult) -> Any:
        where = out / "packages" / Path(result.run_dir).relative_to(out / "runs").as_posix().replace("/", "_")
        if not (where / "manifest.json").is_file():
            export_run(result.run_dir, where, data_dir)
        return load_package(where)

    for seed in sorted({r.seed for r in results}):
        dense = next((r for r in results if r.method == "dense" and r.seed == seed), None)
        if dense is None:
            continue
        todo = [r for r in results if r.seed == seed and compiles_measured(cache, r.run_dir) < compiles]
        work = out / "latency-work"
        for index, result in enumerate(todo):
            print(f"latency [{index + 1}/{len(todo)}] {Job(result.method, result.target, result.seed).label}", flush=True)
            work.mkdir(parents=True, exist_ok=True)
            fresh = Path(tempfile.mkdtemp(prefix=f"{result.method}-{result.target}-s{result.seed}-", dir=work))
            ratio = ratio_over_compiles(package(result), package(dense), profile, LATENCY_BATCH, fresh, data, compiles, protocol)
            with compile_runner(package(result), profile, LATENCY_BATCH, fresh / "absolute") as runner:
                stats = measure_latency(runner, data, LatencyProtocol(warmup_iterations=5, min_iterations=30, min_seconds=1.0))
            cache[result.run_dir] = {"ratio": ratio.median, "per_compile": ratio.per_compile, "compiles": compiles,
                                     "median_ms": stats.median_ms, "other_cpu": ratio.other_cpu_share, "flagged": ratio.flagged}
            atomic_write_json(cache_path, cache)
    for result in results:
        entry = cache.get(result.run_dir)
        if entry:
            result.latency_ratio, result.latency_ms = entry["ratio"], entry["median_ms"]
            result.latency_other_cpu, result.latency_flagged = entry["other_cpu"], entry["flagged"]


# --- the driver ------------------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def job_chains(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped into chains that one worker runs in order: a Torch-Pruning method's targets of
    one seed share that method's dense pretraining run (the first of them trains it, the others reuse
    it), so they form one chain; every other job is a chain of its own. Longest chains first, so a
    parallel run does not end waiting on one long chain started last."""
    chains: dict[tuple[str, int] | Job, list[Job]] = {}
    for job in jobs:
        key: tuple[str, int] | Job = (job.method, job.seed) if job.method in TP_METHODS else job
        chains.setdefault(key, []).append(job)
    return sorted(chains.values(), key=len, reverse=True)


def run_one(job: Job, args: argparse.Namespace) -> int:
    """Train one job in its own process (output to its log under out/logs); the exit code."""
    out = Path(args.out)
    log_path = out / "logs" / (job.run_dir(out).relative_to(out / "runs").as_posix().replace("/", "_") + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads)),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
        return CHILDREN.run(job_command(job, args), stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None).returncode


def run_jobs(jobs: list[Job], args: argparse.Namespace) -> list[Job]:
    """Run every unfinished job, --jobs processes at a time (chains of `job_chains` in order), with a
    progress line per start and finish and an ETA (wall time per finished job so far, times the jobs
    left, over the workers); returns the jobs that failed."""
    out = Path(args.out)
    pending = [job for job in jobs if job_state(job, out) != "done"]
    workers = max(1, min(args.jobs, len(pending) or 1))
    print(f"compare: {len(jobs)} runs, {len(jobs) - len(pending)} already finished, {len(pending)} to train "
          f"({args.epochs} epochs each, {workers} at a time)", flush=True)
    failed: list[Job] = []
    lock = threading.Lock()
    started = time.perf_counter()
    finished = 0

    def eta() -> str:
        if not finished:
            return ""
        per_job = (time.perf_counter() - started) / finished
        return f", ETA {format_seconds(per_job * (len(pending) - finished))}"

    def run_chain(chain: list[Job]) -> None:
        nonlocal finished
        for job in chain:
            with lock:
                if CHILDREN.stopping:                  # a stop signal arrived: start nothing more
                    return
                state = job_state(job, out)
                print(f"[{finished}/{len(pending)} done] {job.label}: {'resuming' if state == 'resume' else 'starting'}{eta()}",
                      flush=True)
            job_started = time.perf_counter()
            try:
                code = run_one(job, args)
            except ChildrenStopped:
                return
            elapsed = time.perf_counter() - job_started
            with lock:
                if CHILDREN.stopping:
                    return
                finished += 1
                if code != 0 or job_state(job, out) != "done":
                    failed.append(job)
                    print(f"[{finished}/{len(pending)} done] {job.label}: FAILED (exit {code}); see {out / 'logs'}", flush=True)
                    continue
                result = result_of(job, out)
                print(f"[{finished}/{len(pending)} done] {job.label}: top-1 {result.top1:.4f}, FLOPs {result.flops_ratio:.3f}, "
                      f"{format_seconds(elapsed)}{eta()}", flush=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run_chain, chain) for chain in job_chains(pending)]:
            future.result()
    return sorted(failed, key=jobs.index)


def parse_list(text: str, kind: type) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/compare")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--flops-targets", default="0.3,0.5", help="comma-separated FLOPs targets (default 0.3,0.5)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated subset of: " + ", ".join(METHODS) + " (default: all but lapp-efficient, which "
                             "needs this machine's layer table for the latency target)")
    parser.add_argument("--epochs", type=int, default=30, help="the epoch budget of every method (default 30)")
    parser.add_argument("--prune-epochs", type=int, default=0, help="LAPP's pruning epochs (0: 20%% of --epochs, at least 1)")
    parser.add_argument("--pretrain-epochs", type=int, default=0,
                        help="Torch-Pruning's dense pretraining epochs, the rest fine-tunes (0: half of --epochs)")
    parser.add_argument("--train-subset", type=int, default=0, help="seeded subset of the training split (0: all)")
    parser.add_argument("--test-subset", type=int, default=0, help="seeded subset of the test split (0: all; for smoke runs)")
    parser.add_argument("--channel-multiple", type=int, default=8)
    parser.add_argument("--min-efficiency", type=float, default=0.8,
                        help="lapp-efficient: its latency ceiling is the FLOPs target / this (measured speedup >= this x "
                             "the FLOPs speedup; default 0.8, issue 9's). Runs are kept by method, target and seed: a "
                             "finished run trained at another value is reused, so give another --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process (default 1)")
    parser.add_argument("--nice", type=int, default=0, help="niceness added to every training process")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training processes at a time (default 1; more on a GPU or a many-core machine: wall "
                             "times then include the contention between them)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--no-latency", action="store_true", help="skip the export and latency measurement")
    parser.add_argument("--compiles", type=int, default=3,
                        help="fresh compiles of each network and its dense run per latency ratio (the median is reported)")
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: summarize (and measure the latency of) the runs already finished in --out, "
                             "e.g. runs trained on another machine")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)       # worker mode: METHOD:TARGET:SEED
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.only:
        return run_worker(args.only, args)
    methods = parse_list(args.methods, str)
    unknown = [m for m in methods if m not in METHODS]
    targets, seeds = parse_list(args.flops_targets, float), parse_list(args.seeds, int)
    if unknown or not methods:
        print(f"compare: error: --methods must come from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if not targets or any(not 0 < t <= 1 for t in targets) or not seeds or args.epochs < 2 or args.jobs < 1 or args.compiles < 1:
        print("compare: error: --flops-targets must lie in (0, 1], --seeds must name one seed or more, --epochs >= 2, --jobs >= 1, "
              "--compiles >= 1",
              file=sys.stderr)
        return 2
    if any(METHODS[m].shaped_for_speed for m in methods):
        if not args.min_efficiency > 0 or not all(0 < t / args.min_efficiency <= 1 for t in targets):
            print("compare: error: lapp-efficient's latency ceiling, each FLOPs target / --min-efficiency, must lie in (0, 1]",
                  file=sys.stderr)
            return 2
        missing = latency_table_missing(args)
        if missing:
            print(f"compare: error: lapp-efficient needs {missing}", file=sys.stderr)
            return 2
    if any(METHODS[m].kind == "tp" for m in methods):
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("compare: error: the Torch-Pruning methods need the torch-pruning package (a lapp-edge dependency: "
                  "make setup installs it); or leave tp-* out of --methods", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(methods, targets, seeds)
    started = time.perf_counter()
    with CHILDREN.stop_on_signal():
        failed = [] if args.no_train else run_jobs(jobs, args)
    results = [result_of(job, out) for job in jobs if job_state(job, out) == "done"]
    if not args.no_latency and results:
        measure_latencies(results, out, args.data_dir or None, args.compiles)
    summaries = summarize(results)
    settings = {k: v for k, v in vars(args).items() if k != "only"}
    settings.update(prune_epochs=prune_epochs_of(args), pretrain_epochs=pretrain_epochs_of(args))
    checks = goal_checks(results, summaries)
    variants = variant_checks(results, summaries)
    atomic_write_json(out / "results.json", {"settings": settings, "runs": [asdict(r) for r in results],
                                             "summary": [asdict(s) for s in summaries],
                                             "goals": [asdict(c) for c in checks],
                                             "variants": [asdict(c) for c in variants],
                                             "failed": [job.label for job in failed],
                                             "missing": [job.label for job in jobs if job_state(job, out) != "done"]})
    table = markdown_table(summaries)
    if checks:
        table += "\n\nLAPP against the best peer (issue 12's goals):\n\n" + goals_table(checks)
    if variants:
        table += "\n\nLAPP's variants against LAPP, paired by seed:\n\n" + variants_table(variants)
    atomic_write_text(out / "results.md", table + "\n")
    plot(summaries, out)
    print(table)
    print(f"compare: {len(results)} runs in {out} (this invocation {format_seconds(time.perf_counter() - started)})")
    if failed:
        print(f"compare: error: runs failed: {', '.join(job.label for job in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
