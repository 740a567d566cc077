"""`lapp-edge run-all CONFIG.yaml [--out DIR]`: the whole mission from one file, with the stage
functions the other commands use: train the slim network (LAPP to a FLOPs or latency budget) and the dense
baseline, export both (verified packages), bench the slim package on every target with the dense
one measured side by side, and write the finished report (table + plot).

    out: runs/demo                      # where everything goes (--out overrides); relative to the working directory
    model: resnet20
    data: fashion-mnist                 # or a mapping: {dataset, data_dir, input_size, augment, mean, std,
                                        #                train_subset, test_subset}
    budget: 0.4                         # kept share of the dense network's FLOPs (or {flops: 0.4}); or a latency
                                        # budget on a target, as its layer table predicts it (lapp-edge profile-layers):
                                        # {latency: 0.5, target: x86-ort-fp32} (share of the dense latency) or
                                        # {latency_ms: 1.5, target: ...}; optional batch (default: the profile's
                                        # largest) and table (a layer-table file); target and latency may be lists
                                        # (several targets, the tightest binding). The budget's targets are benched.
                                        # missing_table: stop (default: no layer table for a target on this machine
                                        # stops the run before anything is written) or flops (that target's budget is
                                        # left out, with a line naming the command that makes its table; with none
                                        # left the run trains to train: max_flops of the FLOPs alone, block removal off)
    epochs: 3
    prune_epochs: 1                     # optional (TrainConfig's default otherwise)
    targets: [x86-ort-fp32, x86-ort-int8]   # profile names or YAML paths ("target: NAME" for one; "available":
                                        # every shipped profile whose runtime this machine has)
    dense_baseline: true                # optional: train the dense network too and compare on every target
    parallel_training: true             # optional: slim and dense train at the same time, each in its own
                                        # process with half the cores (unless train.threads says otherwise)
    compiles: 3                         # optional: fresh compiles behind each predicted-vs-measured latency
                                        # (bench --compiles; fewer is faster, more averages compile noise)
    test_images: 2000                   # optional: bench's top-1 on the first N test images (bench --test-images;
                                        # default: the whole test split)
    train: {batch_size: 128}            # optional: any other `lapp-edge train` setting (TrainConfig field names:
                                        # --quiet is progress: false, --no-bypass is bypass: false)

Every key is used or refused (unknown keys, a setting given twice, a bad value: one line, exit 2),
and everything is checked (settings, data, reachable budget, profiles, calibration sets) before
anything is written. The config is stored in the output directory (`run-all.yaml`); running the
same config again continues where it stopped (training resumes from its checkpoints, finished
stages are kept); a different config for the same directory is refused.

    DIR/run-all.yaml  DIR/budget.json (missing_table: flops: the budget as resolved when the run started)
    DIR/slim/ DIR/dense/ (training runs)  DIR/models/{slim,dense}/ (packages)
    DIR/bench.json  DIR/report.json  DIR/report.txt  DIR/accuracy_vs_latency.png
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from lapp_edge.child_processes import ChildProcesses
from lapp_edge.deploy.measure import COMPILES_PER_RATIO
from lapp_edge.deploy.targets import check_input_shape
from lapp_edge.errors import UserError
from lapp_edge.fileio import check_output_location

CONFIG_NAME = "run-all.yaml"
TOP_LEVEL = ("out", "model", "data", "budget", "epochs", "prune_epochs", "targets", "target", "dense_baseline",
             "parallel_training", "compiles", "test_images", "train")
DATA_KEYS = ("dataset", "data_dir", "input_size", "augment", "mean", "std", "train_subset", "test_subset")
# the budget's keys and the TrainConfig field each sets (so `train` may not set them)
BUDGET_KEY_FIELDS = {"flops": "flops_target", "latency": "latency_target", "latency_ms": "latency_budget_ms",
                     "target": "target", "batch": "latency_batch", "table": "latency_table"}
MISSING_TABLE_POLICIES = ("stop", "flops")            # budget: missing_table
BUDGET_KEYS = (*BUDGET_KEY_FIELDS, "missing_table")
TOP_LEVEL_FIELDS = ("model", "epochs", "prune_epochs")      # TrainConfig fields set by the config's top-level keys
BUDGET_FIELDS = tuple(BUDGET_KEY_FIELDS.values())


def add_run_all_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run-all", help="train slim + dense, export, bench every target, report (one YAML config)",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="config keys:\n" + __doc__.split("\n\n")[1])
    p.add_argument("config", help="the run's YAML config (stored in the output directory)")
    p.add_argument("--out", default=None, help="output directory (default: the config's 'out')")
    p.set_defaults(handler=run_all_command)


def load_config(path: Path) -> tuple[dict[str, Any], str]:
    """The config mapping and its text. UserError for a missing file, bad YAML or unknown keys."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        payload = yaml.safe_load(text)
    except OSError as error:
        raise UserError(f"cannot read run-all config {path}: {error.strerror or error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path} must be a mapping with model, data, budget, epochs, targets")
    unknown = sorted(str(k) for k in payload if k not in TOP_LEVEL)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; a run-all config takes {', '.join(TOP_LEVEL)}")
    return payload, text


def train_configs(payload: dict[str, Any], out: Path, where: Path, parallel: bool = False) -> tuple[Any, Any | None]:
    """The slim (LAPP) TrainConfig and the dense one (None without dense_baseline), checked. Trained in
    parallel without `threads` given, each run takes half the machine's cores."""
    from lapp_edge.training.config import LAPP_ONLY, TrainConfig, defaults, field_of_flag, flag_name, validate_config

    missing = [key for key in ("model", "data", "budget", "epochs") if key not in payload]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
    data = payload["data"]
    data = {"dataset": data} if isinstance(data, str) else data
    if not isinstance(data, dict) or "dataset" not in data:
        raise UserError(f"{where}: data must be a dataset name or a mapping with 'dataset' (and {', '.join(DATA_KEYS[1:])})")
    bad = sorted(str(k) for k in data if k not in DATA_KEYS)
    if bad:
        raise UserError(f"{where}: data: unknown key(s) {', '.join(bad)}; data takes {', '.join(DATA_KEYS)}")
    train = payload.get("train") or {}
    if not isinstance(train, dict):
        raise UserError(f"{where}: train must be a mapping of `lapp-edge train` settings")
    known = set(defaults())
    reserved = {"out", "dense", *TOP_LEVEL_FIELDS, *BUDGET_FIELDS, *DATA_KEYS}
    bad = sorted(str(k) for k in train if k not in known or k in reserved)
    renamed = [(key, found) for key in bad if (found := field_of_flag(key)) is not None]
    if renamed:                       # a flag written as a key: name the key it sets
        key, (name, value) = renamed[0]
        setting = f"{name}: {str(value).lower()}" if isinstance(value, bool) else name
        raise UserError(f"{where}: train: {key} is the command-line flag {flag_name(name)}; in a config write {setting}")
    if bad:
        raise UserError(f"{where}: train: {', '.join(bad)} cannot be set there (unknown, or set by model/data/budget/epochs/"
                        "prune_epochs at the top level)")
    common: dict[str, Any] = {"model": payload["model"], "epochs": payload["epochs"], **data, **train}
    if parallel and payload.get("dense_baseline", True) is True and "threads" not in train:
        common["threads"] = max(1, (os.cpu_count() or 2) // 2)
    lapp: dict[str, Any] = budget_settings(payload["budget"], where)
    if "prune_epochs" in payload:
        lapp["prune_epochs"] = payload["prune_epochs"]
    dense_baseline = payload.get("dense_baseline", True)
    if not isinstance(dense_baseline, bool):
        raise UserError(f"{where}: dense_baseline must be true or false")
    try:
        slim = TrainConfig(out=str(out / "slim"), **common, **lapp)
        dense = TrainConfig(out=str(out / "dense"), dense=True, **{k: v for k, v in common.items() if k not in LAPP_ONLY}) \
            if dense_baseline else None
    except TypeError as error:
        raise UserError(f"{where}: {error}") from None
    for config in (slim, dense):
        if config is not None:
            _check_types(config, where)
            try:
                validate_config(config)
            except UserError as error:             # train's flag names -> this file's keys, naming the file
                raise UserError(f"{where}: {as_config_keys(str(error))}") from None
    missing_table_policy(payload["budget"], slim, where)
    return slim, dense


def missing_table_policy(budget: object, slim: Any, where: Path) -> str:
    """The budget's `missing_table` ("stop" unless given; see the module docstring), checked: "flops" needs a
    latency budget and `train: max_flops`, the FLOPs share the run falls back to. UserError, one line, otherwise."""
    policy = budget.get("missing_table", "stop") if isinstance(budget, dict) else "stop"
    if policy not in MISSING_TABLE_POLICIES:
        raise UserError(f"{where}: budget: missing_table must be {' or '.join(MISSING_TABLE_POLICIES)}, got {policy!r}")
    if policy == "flops" and not slim.max_flops:
        raise UserError(f"{where}: budget: missing_table: flops trains to the FLOPs share train: max_flops where no budget "
                        "target has a layer table on this machine; set train: max_flops")
    return policy


# the TrainConfig fields `missing_table: flops` may change, stored as resolved when a run-all starts (RESOLVED_BUDGET)
RESOLVED_FIELDS = ("flops_target", "target", "latency_target", "latency_budget_ms", "latency_batch", "latency_table",
                   "max_flops", "land_on_flops", "measure_at_freeze", "block_removal", "keep_blocks")
RESOLVED_BUDGET = "budget.json"


def drop_targets_without_table(slim: Any, where: Path) -> tuple[Any, list[str]]:
    """`missing_table: flops`: the slim run's TrainConfig without the budget targets this machine cannot shape
    for (no layer table for it here, or, where the freeze measures its plan, no runtime for it), and one line
    per target left out, naming the command that makes its table. With no target left, the run trains to
    `max_flops` of the FLOPs alone, as a FLOPs budget does (block removal off: it is measured to pay for
    itself only under a latency ceiling, docs/RESULTS.md). The data is read for its input shape (the
    table's key). UserError, in the config's words, where the data cannot be read."""
    from dataclasses import replace

    from lapp_edge.data.torch_data import load_dataset
    from lapp_edge.deploy.measure import machine_key
    from lapp_edge.deploy.targets import load_target
    from lapp_edge.training.config import defaults, split_values, validate_config
    from lapp_edge.cli.train import targets_without_runtime
    from lapp_edge.training.latency import targets_without_table
    from lapp_edge.training.trainer import data_options

    try:
        info = load_dataset(slim.dataset, slim.data_dir, data_options(slim)).info
    except UserError as error:
        raise UserError(f"{where}: {as_config_keys(str(error))}") from None
    shape = (info.in_channels, info.input_size, info.input_size)
    size = "x".join(map(str, shape))
    flags = (f" --grid-multiple {slim.channel_multiple}" if slim.channel_multiple else "") \
        + (" --block-removal" if slim.block_removal else "")
    targets = split_values(slim.target)
    reasons = {name: f"no layer table for {slim.model} / {size} on this machine ({machine_key()}); lapp-edge profile-layers "
                     f"--target {load_target(name).argument} --model {slim.model} --input {size}{flags} makes one"
               for name in targets_without_table(slim, shape)}
    for name, why in (targets_without_runtime(slim) if slim.measure_at_freeze else {}).items():
        reasons.setdefault(name, f"the freeze measures its plan there, and its runtime cannot run here ({why})")
    if not reasons:
        return slim, []
    notes = [f"budget: {name}: its latency budget is left out (missing_table: flops): {why}" for name, why in reasons.items()]
    kept = [i for i, name in enumerate(targets) if name not in reasons]
    if kept:
        budget_field = "latency_target" if slim.latency_target else "latency_budget_ms"
        values = split_values(getattr(slim, budget_field))
        values = values if len(values) == 1 else [values[i] for i in kept]
        resolved = replace(slim, target=",".join(targets[i] for i in kept), **{budget_field: ",".join(values)})
    else:
        resolved = replace(slim, **{**{name: defaults()[name] for name in RESOLVED_FIELDS}, "flops_target": slim.max_flops})
        notes.append(f"budget: no budget target can be shaped for here: LAPP trains to {slim.max_flops} of the dense FLOPs "
                     "alone (train: max_flops), block removal off")
    try:
        validate_config(resolved)
    except UserError as error:
        raise UserError(f"{where}: {as_config_keys(str(error))}") from None
    return resolved, notes


def resolved_budget(slim: Any, out: Path, resuming: bool, where: Path) -> tuple[Any, list[str]]:
    """`missing_table: flops`: the slim run's budget as `drop_targets_without_table` resolves it, or, resuming a
    run-all that stored one (RESOLVED_BUDGET), as it was resolved when the run started: a table made since
    (what the printed line asks for) must not change what a half-trained run trains to, nor what its
    report says it was shaped for."""
    from dataclasses import replace

    from lapp_edge.fileio import read_json

    stored = out / RESOLVED_BUDGET
    if resuming and stored.is_file():
        saved = read_json(stored)
        if not isinstance(saved, dict) or not isinstance(saved.get("fields"), dict) or set(saved["fields"]) != set(RESOLVED_FIELDS) \
                or not isinstance(saved.get("notes"), list):
            raise UserError(f"{stored} is damaged: remove {out} and run the config again, or use another --out")
        return replace(slim, **saved["fields"]), [str(note) for note in saved["notes"]]
    return drop_targets_without_table(slim, where)


def as_config_keys(message: str) -> str:
    """A `lapp-edge train` error in a run-all config's words: `--flops-target` -> `budget`, `--latency-target`
    -> `budget: latency` (each budget field by its budget key), `--data-dir` -> `data: data_dir`, `--epochs` ->
    `epochs`, any other `--some-flag` -> `train: some_flag`. A command the message suggests (from `lapp-edge `
    on) is left as it is, to be run as printed."""
    budget_key = {field: key for key, field in BUDGET_KEY_FIELDS.items()}

    def key(match: re.Match[str]) -> str:
        field = match.group(1).replace("-", "_")
        if field == "flops_target":
            return "budget"
        if field in budget_key:
            return f"budget: {budget_key[field]}"
        if field in DATA_KEYS:
            return f"data: {field}"
        return field if field in TOP_LEVEL_FIELDS else f"train: {field}"
    words, command, hint = message.partition("lapp-edge ")
    return re.sub(r"--([a-z][a-z0-9-]*)", key, words) + command + hint


def budget_settings(budget: object, where: Path) -> dict[str, Any]:
    """The TrainConfig fields of the config's `budget` (see the module docstring): a number is the kept
    FLOPs share; a mapping gives `flops`, or `latency` / `latency_ms` with `target` (a name or a list) and
    optionally `batch` and `table`. UserError, one line, for any other shape; the values themselves are
    checked by `validate_config` (ranges, one value per target, a table per target)."""
    if not isinstance(budget, dict):
        return {"flops_target": budget}
    unknown = sorted(str(k) for k in budget if k not in BUDGET_KEYS)
    if unknown:
        raise UserError(f"{where}: budget: unknown key(s) {', '.join(unknown)}; budget takes {', '.join(BUDGET_KEYS)}")
    kinds = [k for k in ("flops", "latency", "latency_ms") if k in budget]
    if len(kinds) != 1:
        raise UserError(f"{where}: budget must give exactly one of flops, latency (a share of the dense latency) or "
                        f"latency_ms, got {', '.join(kinds) or 'none'}")
    if kinds == ["flops"]:
        extra = sorted(str(k) for k in budget if k != "flops")
        if extra:
            raise UserError(f"{where}: budget: {', '.join(extra)} {'goes' if len(extra) == 1 else 'go'} only with a latency budget")
        return {"flops_target": budget["flops"]}
    if "target" not in budget:
        raise UserError(f"{where}: a latency budget needs target: the profile(s) whose latency it is (lapp-edge targets)")

    def listed(key: str, kind: tuple[type, ...]) -> str:
        values = budget[key] if isinstance(budget[key], list) else [budget[key]]
        if not values or any(isinstance(v, bool) or not isinstance(v, kind) or (isinstance(v, str) and not v.strip())
                             for v in values):
            what = "a number or a list of numbers" if kind != (str,) else "a name or a list of names"
            raise UserError(f"{where}: budget: {key} must be {what}, got {budget[key]!r}")
        return ",".join(str(v) for v in values)

    settings: dict[str, Any] = {"target": listed("target", (str,)), BUDGET_KEY_FIELDS[kinds[0]]: listed(kinds[0], (int, float))}
    if "batch" in budget:
        settings["latency_batch"] = budget["batch"]
    if "table" in budget:
        settings["latency_table"] = listed("table", (str,))
    return settings


def budget_title(config: Any, report: dict[str, Any]) -> str:
    """What the slim network was trained to, for the report's title."""
    from lapp_edge.training.config import split_values

    flops = f"{report['flops']['ratio']:.3f} of the dense FLOPs"
    if not config.latency_constrained:
        return f"LAPP to {flops} (budget {config.flops_target})"
    values = split_values(config.latency_target or config.latency_budget_ms)
    unit = "x{} of the dense latency" if config.latency_target else "{} ms"
    shaped = ", ".join(f"{unit.format(values[min(i, len(values) - 1)])} on {target}"
                       for i, target in enumerate(split_values(config.target)))
    at_batch = f" at batch {config.latency_batch}" if config.latency_batch else ""
    if config.max_flops and config.land_on_flops:
        return f"LAPP to {flops} (landed on {config.max_flops}) under latency ceilings ({shaped}{at_batch})"
    bound = f"; FLOPs at most {config.max_flops}" if config.max_flops else ""
    return f"LAPP to a latency budget ({shaped}{at_batch}{bound}), {flops}"


def _check_types(config: Any, where: Path) -> None:
    """YAML gives ints, floats, strings and booleans: each must fit its field (bool is not an int here)."""
    from lapp_edge.training.config import defaults

    for item in fields(config):
        default, value = defaults().get(item.name), getattr(config, item.name)
        if item.name == "out" or value == default:
            continue
        expected: tuple[type, ...] = (str, type(None)) if default is None else (bool,) if isinstance(default, bool) else \
            (int, float) if isinstance(default, float) else (type(default),)
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            raise UserError(f"{where}: {item.name} must be {' or '.join(t.__name__ for t in expected)}, got {value!r}")


EPOCH_LINE = re.compile(r"^epoch +\d+ \[")


def train_in_parallel(trainers: dict[str, tuple[Any, bool]]) -> None:
    """Train the runs at the same time, each in its own `lapp-edge train --resume` process (its
    config.json is written first, so it starts from epoch 0 or its last checkpoint), output in
    <run>/train.log; each finished epoch is echoed here. A failure is one line naming the run.
    SIGTERM, SIGHUP or SIGINT to this process stops the training processes too (`ChildProcesses`):
    the same command resumes them."""
    children = ChildProcesses("lapp-edge run-all")
    with children.stop_on_signal():
        _train_in_parallel(trainers, children)


def _train_in_parallel(trainers: dict[str, tuple[Any, bool]], children: ChildProcesses) -> None:
    from lapp_edge.training.run_dir import RunDirectory

    processes, logs = {}, {}
    for name, (trainer, _) in trainers.items():
        run_dir = RunDirectory(trainer.config.out)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.write_config(asdict(trainer.config))
        print(f"== train {name}: {trainer.config.out} (in parallel, {trainer.config.threads} thread(s), log {run_dir.path / 'train.log'})")
        print("\n".join(f"   {line}" for line in trainer.decisions()), flush=True)
        logs[name] = run_dir.path / "train.log"
        with open(logs[name], "ab") as log:
            processes[name] = children.start([sys.executable, "-m", "lapp_edge.cli", "train", "--out", trainer.config.out, "--resume"],
                                             stdout=log, stderr=subprocess.STDOUT)
    trainers.clear()                                   # free the data the checks loaded
    seen = {name: 0 for name in processes}
    while True:
        running = [name for name, process in processes.items() if process.poll() is None]
        for name in processes:
            text = logs[name].read_bytes()[seen[name]:].decode("utf-8", "replace")
            complete = text.rfind("\n") + 1
            seen[name] += len(text[:complete].encode("utf-8"))
            for line in text[:complete].replace("\r", "\n").splitlines():
                if EPOCH_LINE.match(line):
                    print(f"   [{name}] {line}", flush=True)
        if not running:
            break
        time.sleep(2)
    for name, process in processes.items():
        if process.returncode != 0:
            lines = [l for l in logs[name].read_text(errors="replace").replace("\r", "\n").splitlines() if l.startswith("lapp-edge: error:")]
            why = lines[-1].removeprefix("lapp-edge: error: ") if lines else f"exit code {process.returncode}"
            raise UserError(f"training {name} failed: {why} (log {logs[name]}; run the same config again to resume)")


def target_list(payload: dict[str, Any], where: Path) -> list[str]:
    """The targets to bench: a list of profile names or paths, or `available`: every shipped profile
    whose runtime this machine has (the others are named)."""
    if "targets" in payload and "target" in payload:
        raise UserError(f"{where}: give 'targets' (a list) or 'target' (one), not both")
    targets = payload.get("targets", [payload["target"]] if "target" in payload else None)
    if targets == "available":
        from lapp_edge.deploy.backends import runtime_available
        from lapp_edge.deploy.targets import load_target
        from lapp_edge.resources import find_profile, profile_names

        targets, skipped = [], []
        for name in profile_names():
            available, why = runtime_available(load_target(find_profile(name)).backend)
            (targets if available else skipped).append(name if available else f"{name} ({why})")
        if skipped:
            print(f"targets: skipping {', '.join(skipped)}: not runnable here", flush=True)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise UserError(f"{where}: targets must be a non-empty list of target profile names or paths")
    return targets


def run_all_command(args: argparse.Namespace) -> int:
    from lapp_edge.cli.train import freeze_measurer
    from lapp_edge.deploy.bench import run_bench
    from lapp_edge.deploy.calibration_set import load_definition
    from lapp_edge.deploy.summary import format_mission, mission_rows, plot_mission, table_batch
    from lapp_edge.deploy.targets import load_target
    from lapp_edge.export.package_writer import export_run
    from lapp_edge.fileio import atomic_write_json, atomic_write_text, read_json
    from lapp_edge.training.config import split_values
    from lapp_edge.training.run_dir import RunDirectory
    from lapp_edge.training.trainer import Trainer

    import yaml

    began = time.monotonic()
    where = Path(args.config)
    payload, text = load_config(where)
    out_value = args.out if args.out is not None else payload.get("out")
    if not isinstance(out_value, str) or not out_value:
        raise UserError(f"{where}: no output directory: set 'out' in the config or pass --out")
    out = Path(out_value)
    check_output_location(out, "--out" if args.out else f"{where}: out", "dir")
    parallel = payload.get("parallel_training", True)
    if not isinstance(parallel, bool):
        raise UserError(f"{where}: parallel_training must be true or false")
    compiles = payload.get("compiles", COMPILES_PER_RATIO)
    if isinstance(compiles, bool) or not isinstance(compiles, int) or compiles < 1:
        raise UserError(f"{where}: compiles must be an integer of at least 1, got {compiles!r}")
    test_images = payload.get("test_images")
    if test_images is not None and (isinstance(test_images, bool) or not isinstance(test_images, int) or test_images < 1):
        raise UserError(f"{where}: test_images must be an integer of at least 1 (or left out: the whole test split), "
                        f"got {test_images!r}")
    slim_config, dense_config = train_configs(payload, out, where, parallel)

    # the output directory: new, or this very config's (then finished stages are kept and training resumes)
    stored = out / CONFIG_NAME
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    resuming = stored.is_file()
    if resuming:
        previous = yaml.safe_load(stored.read_text(encoding="utf-8"))
        if {k: v for k, v in (previous or {}).items() if k != "out"} != {k: v for k, v in payload.items() if k != "out"}:
            raise UserError(f"{out} holds a run-all of another config ({stored}); use another --out or the same config")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already holds files that are not a run-all; choose another --out")
    budget_notes: list[str] = []              # budget: missing_table: flops, where a target cannot be shaped for here
    resolving = missing_table_policy(payload["budget"], slim_config, where) == "flops" and slim_config.latency_constrained
    if resolving:
        slim_config, budget_notes = resolved_budget(slim_config, out, resuming, where)
        for note in budget_notes:
            print(note, flush=True)

    targets = target_list(payload, where)
    profiles = {t: load_target(t) for t in targets}             # every profile, before any work
    benched = {profile.name for profile in profiles.values()}
    budget_profiles = {t: load_target(t) for t in split_values(slim_config.target)} if slim_config.latency_constrained else {}
    shaped_for = {t: profile for t, profile in budget_profiles.items() if profile.name not in benched}
    if shaped_for:                                               # a budget's target is always measured
        print(f"targets: adding {', '.join(shaped_for)} (the latency budget's target) to the bench", flush=True)
        targets += list(shaped_for)
        profiles.update(shaped_for)
    for profile in profiles.values():                           # and every calibration set they name
        if profile.precision == "int8":
            load_definition(profile.calibration)

    runs = [("slim", slim_config)] + ([("dense", dense_config)] if dense_config is not None else [])
    trainers = {}
    for name, config in runs:                                    # data, sizes, budget: all checked before writing
        run_dir = Path(config.out)
        if (run_dir / "report.json").is_file():
            continue
        resume = resuming and run_dir.is_dir() and any(run_dir.iterdir())
        RunDirectory(run_dir).check_usable(resume)
        try:
            trainers[name] = (Trainer(config, measure=freeze_measurer(config)), resume)
        except UserError as error:
            raise UserError(f"{where}: {as_config_keys(str(error))}") from None
    for profile in profiles.values():                              # a bench target the trained model will not fit
        for shape in {trainer.input_shape for trainer, _ in trainers.values()}:
            check_input_shape(profile, shape, f"the {slim_config.model} trained on this data")

    out.mkdir(parents=True, exist_ok=True)
    if resolving and not (out / RESOLVED_BUDGET).is_file():
        atomic_write_json(out / RESOLVED_BUDGET, {"fields": {name: getattr(slim_config, name) for name in RESOLVED_FIELDS},
                                                  "notes": budget_notes})
    if not resuming:
        atomic_write_text(stored, text)
    if parallel and len(trainers) > 1:
        train_in_parallel(trainers)
    else:
        for name, (trainer, resume) in trainers.items():
            print(f"== train {name}: {trainer.config.out}", flush=True)
            print("\n".join(trainer.decisions()), flush=True)
            trainer.run(resume=resume)
    packages = {}
    for name, config in runs:
        package = out / "models" / name
        print(f"== export {name}: {package}", flush=True)
        manifest = export_run(config.out, package)
        check = manifest["verification"]
        print(f"   verified: ORT vs PyTorch on {check['images']} test images, max |diff| {check['max_abs_diff']:.2e} "
              f"({check.get('max_rel_diff', 0.0):.1e} of max|logit|), top-1 agreement {check['top1_agreement']:.4f}", flush=True)
        packages[name] = package
    print(f"== bench {packages['slim']} on {', '.join(targets)}"
          + (", dense measured side by side" if "dense" in packages else ""), flush=True)
    report = run_bench(packages["slim"], targets, str(out / "bench.json"), baseline_dir=packages.get("dense"),
                       compiles=compiles, test_images=test_images)
    bench = asdict(report)
    rows = mission_rows(bench)
    slim_report = read_json(Path(slim_config.out) / "report.json")
    title = f"{slim_config.model} on {slim_config.dataset}: {budget_title(slim_config, slim_report)}, {slim_config.epochs} epochs" \
        + (f"; bench top-1 on the first {test_images} test images" if test_images else "")
    batch = table_batch(rows)
    table = format_mission(rows, batch)
    plot = out / "accuracy_vs_latency.png"
    plot_mission(rows, plot, batch, title=title)
    files = {
        "config": str(stored), "slim run": slim_config.out, "dense run": dense_config.out if dense_config else None,
        "slim package": str(packages["slim"]), "dense package": str(packages.get("dense")) if "dense" in packages else None,
        "bench": str(out / "bench.json"), "plot": str(plot), "report": str(out / "report.txt"),
    }
    summary = {"title": title, "budget_notes": budget_notes, "targets": rows, "files": files,
               "seconds": round(time.monotonic() - began, 1)}
    atomic_write_json(out / "report.json", summary)
    heading = "\n".join([title, *budget_notes])
    atomic_write_text(out / "report.txt", f"{heading}\n{table}\n")
    print(f"\n{heading}\n{table}")
    print("files:\n" + "\n".join(f"  {what:14s} {path}" for what, path in files.items() if path))
    minutes, seconds = divmod(int(summary["seconds"]), 60)
    print(f"run-all took {minutes} min {seconds:02d} s (wall clock{', this invocation' if resuming else ''})")
    failed = [row["target"] for row in rows if row.get("status") != "ok"]
    if failed:
        print(f"lapp-edge: error: target(s) {', '.join(failed)} did not run cleanly (see the table)", file=sys.stderr)
        return 2
    return 0
