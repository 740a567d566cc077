"""Target profiles: one YAML file per hardware target (shipped in lapp_edge/resources/targets/;
found by name or path through `lapp_edge.resources.find_profile`).

    name: x86-ort-int8
    backend: onnxruntime-cpu          # see lapp_edge.deploy.backends.BACKEND_MODULES
    precision: int8                   # fp32 | bf16 | int8 (what the backend supports)
    threads: 1                        # intra-op / inference threads
    batch_sizes: [1, 32]              # latency is measured at each
    input_size: [1, 28, 28]           # C, H, W; must match the model package
    calibration: fashion-mnist-train-512   # int8 only: a definition in calibration-sets/
    int8_routes: [nncf, ort-qdq]      # optional, backend-specific; the first is the target's
    latency: {warmup_iterations: 20, min_iterations: 100, min_seconds: 2.0}   # optional
    baselines:                        # what the latency regression tests hold the target to (deploy/regression.py)
      reference_target: x86-ort-fp32
      model: resnet20, fused, 1x28x28 (dense and the shipped slim reference)
      tolerance: 0.25                 # allowed relative shortfall / excess
      machines:                       # per machine (deploy.measure.machine_key: CPU model + ISA flags)
        "AMD EPYC; avx2":
          ratio_to_reference: {1: 0.62}   # dense latency on this target / on the reference target, one process
          speedup: {1: 1.9, 32: 2.1}      # dense / shipped slim latency on this target, one process
          recorded: "2026-11-30T09:00:00+00:00"   # plus versions, load: what `lapp-edge baseline` wrote

Every problem is one line (UserError). Imports no runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lapp_edge.deploy.backends import BACKENDS, get_backend
from lapp_edge.deploy.measure import LatencyProtocol, machine_key
from lapp_edge.errors import UserError
from lapp_edge.fileio import read_yaml, shown
from lapp_edge.resources import find_profile

MAX_NAME_CHARS = 100

REQUIRED = ("name", "backend", "precision", "threads", "batch_sizes", "input_size")
KNOWN = (*REQUIRED, "calibration", "int8_routes", "latency", "baselines", "description", "channel_multiple")
DEFAULT_CHANNEL_MULTIPLE = 8


@dataclass(frozen=True)
class MachineBaseline:
    """A target's latency ratios as recorded on one machine (all measured interleaved in one process)."""

    ratio_to_reference: dict[int, float]       # per batch: dense latency here / dense latency on the reference target
    speedup: dict[int, float]                  # per batch: dense latency / shipped slim reference latency on this target
    recorded: str = ""
    details: dict[str, Any] = field(default_factory=dict)   # versions, load, command


@dataclass(frozen=True)
class LatencyBaselines:
    """What the latency regression tests hold a target to, per machine."""

    reference_target: str
    model: str
    tolerance: float
    machines: dict[str, MachineBaseline] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetProfile:
    """One hardware target: runtime backend, precision, threads, batches, input shape, int8
    calibration set and routes, latency protocol and regression baselines."""
    name: str
    backend: str
    precision: str
    threads: int
    batch_sizes: tuple[int, ...]
    input_shape: tuple[int, int, int]
    calibration: str = ""
    int8_routes: tuple[str, ...] = ()
    latency: LatencyProtocol = field(default_factory=LatencyProtocol)
    baselines: LatencyBaselines | None = None
    path: str = ""
    # widths a network shaped for this target rounds to, by the first CPU feature flag this machine
    # has ("default" where none matches); see channel_multiple_for
    channel_multiples: tuple[tuple[str, int], ...] = (("default", DEFAULT_CHANNEL_MULTIPLE),)

    @property
    def argument(self) -> str:
        """How a command line names this profile (`--target ...` in a printed hint): its name where the
        name finds this very file, else the path it was read from (a user's own profile)."""
        try:
            if not self.path or Path(find_profile(self.name)).resolve() == Path(self.path).resolve():
                return self.name
        except UserError:
            pass
        return self.path


def _positive_int(value: Any, where: str, high: int = 1 << 16) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
        raise UserError(f"{where} must be a positive integer (at most {high}), not {shown(value)}")
    return value


def _name(value: Any, where: str) -> str:
    """A short printable name (a profile or set name, a reference target, a model label)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
        raise UserError(f"{where} must be a printable string of 1-{MAX_NAME_CHARS} characters, not {shown(value)}")
    return value


def _ratios(payload: Any, where: str) -> dict[int, float]:
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise UserError(f"{where} must map batch sizes to ratios")
    parsed: dict[int, float] = {}
    for batch, ratio in payload.items():
        _positive_int(batch, f"{where}: batch")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1e6:
            raise UserError(f"{where}: the ratio for batch {batch} must be a positive number")
        parsed[int(batch)] = float(ratio)
    return parsed


def _baselines(payload: Any, where: str) -> LatencyBaselines:
    if not isinstance(payload, dict):
        raise UserError(f"{where}: baselines must be a mapping")
    missing = [key for key in ("reference_target", "model", "tolerance") if key not in payload]
    if missing:
        raise UserError(f"{where}: baselines miss field(s): {', '.join(missing)}")
    tolerance = payload["tolerance"]
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise UserError(f"{where}: baselines.tolerance must be in (0, 1)")
    machines_payload = payload.get("machines") or {}
    if not isinstance(machines_payload, dict):
        raise UserError(f"{where}: baselines.machines must map machine keys to recorded ratios")
    machines: dict[str, MachineBaseline] = {}
    for key, entry in machines_payload.items():
        if not isinstance(entry, dict):
            raise UserError(f"{where}: baselines.machines[{str(key)[:60]!r}] must be a mapping")
        machines[str(key)] = MachineBaseline(
            _ratios(entry.get("ratio_to_reference"), f"{where}: baselines ratio_to_reference"),
            _ratios(entry.get("speedup"), f"{where}: baselines speedup"), str(entry.get("recorded", "")),
            {k: v for k, v in entry.items() if k not in ("ratio_to_reference", "speedup", "recorded")})
    return LatencyBaselines(_name(payload["reference_target"], f"{where}: baselines.reference_target"),
                            _name(payload["model"], f"{where}: baselines.model"), float(tolerance), machines)


def _latency(payload: Any, where: str) -> LatencyProtocol:
    if payload is None:
        return LatencyProtocol()
    if not isinstance(payload, dict):
        raise UserError(f"{where}: latency must be a mapping")
    known = {"warmup_iterations", "min_iterations", "min_seconds", "max_seconds"}
    unknown = set(payload) - known
    if unknown:
        raise UserError(f"{where}: unknown latency field(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e6:
            raise UserError(f"{where}: latency.{key} must be a number in [0, 1e6]")
        values[key] = int(value) if key.endswith("iterations") else float(value)
    return LatencyProtocol(**values)


def parse_profile(payload: Any, where: str) -> TargetProfile:
    """Validate a profile mapping against the schema and the backend registry."""
    if not isinstance(payload, dict):
        raise UserError(f"{where}: a target profile must be a YAML mapping")
    missing = [key for key in REQUIRED if key not in payload]
    unknown = sorted(str(key) for key in set(payload) - set(KNOWN))
    if missing or unknown:                       # both at once: `thread: 1` is a typo of the missing `threads`
        parts = ([f"missing field(s): {', '.join(missing)}"] if missing else []) + \
                ([f"unknown field(s): {', '.join(unknown)}"] if unknown else [])
        raise UserError(f"{where}: {'; '.join(parts)}")
    name = _name(payload["name"], f"{where}: name")
    backend = payload["backend"]
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise UserError(f"{where}: unknown backend {shown(backend)}; choose one of: {', '.join(BACKENDS)}")
    precision = payload["precision"]
    precisions = BACKENDS[backend].precisions
    if not isinstance(precision, str) or precision not in precisions:
        raise UserError(f"{where}: backend {backend} has no precision {shown(precision)}; choose one of: {', '.join(precisions)}")
    threads = _positive_int(payload["threads"], f"{where}: threads")
    batches = payload["batch_sizes"]
    if not isinstance(batches, list) or not batches:
        raise UserError(f"{where}: batch_sizes must be a non-empty list")
    batch_sizes = tuple(_positive_int(b, f"{where}: batch size") for b in batches)
    size = payload["input_size"]
    if not isinstance(size, list) or len(size) != 3:
        raise UserError(f"{where}: input_size must be [C, H, W]")
    c, h, w = (_positive_int(v, f"{where}: input_size entry", 4096) for v in size)
    calibration = payload.get("calibration") or ""
    if precision == "int8" and not calibration:
        raise UserError(f"{where}: an int8 target needs a calibration set (field 'calibration')")
    if calibration:
        calibration = _name(calibration, f"{where}: calibration")
    routes = payload.get("int8_routes") or []
    known_routes = BACKENDS[backend].int8_routes
    if not isinstance(routes, list) or any(not isinstance(r, str) or r not in known_routes for r in routes):
        raise UserError(f"{where}: int8_routes must be a list drawn from: {', '.join(known_routes)}")
    if routes and precision != "int8":
        raise UserError(f"{where}: int8_routes only apply to an int8 target")
    baselines = _baselines(payload["baselines"], where) if payload.get("baselines") is not None else None
    return TargetProfile(
        name=name, backend=backend, precision=precision, threads=threads, batch_sizes=batch_sizes,
        input_shape=(c, h, w), calibration=str(calibration), int8_routes=tuple(routes),
        latency=_latency(payload.get("latency"), where), baselines=baselines, path=where,
        channel_multiples=_channel_multiples(payload.get("channel_multiple"), where),
    )


def _channel_multiples(payload: Any, where: str) -> tuple[tuple[str, int], ...]:
    if payload is None:
        return (("default", DEFAULT_CHANNEL_MULTIPLE),)
    if not isinstance(payload, dict):
        payload = {"default": payload}
    items = tuple((str(key), _positive_int(value, f"{where}: channel_multiple {key}", 1024)) for key, value in payload.items())
    if not any(key == "default" for key, _ in items):
        raise UserError(f"{where}: channel_multiple needs a 'default' entry (for CPUs with none of the listed features)")
    return items


def channel_multiple_for(profile: TargetProfile, cpu_flags: set[str] | None = None) -> int:
    """The channel multiple a network shaped for `profile` rounds its widths to on this machine:
    the entry of the first listed CPU feature flag this CPU has (e.g. amx_int8: 32, avx512f: 16),
    else the profile's default. Why these numbers: oneDNN's blocked layouts hold 8 fp32 channels per
    AVX2 register and 16 per AVX-512 one, AMX tiles 32 int8 / 16 bf16 per row, and widths off those
    blocks measured up to 1.66x slower (../shared/DEPLOY_NOTES.md); TensorRT's fp16 tensor cores take
    multiples of 8, int8 ones 32."""
    from lapp_edge.deploy.measure import cpu_flags as read_cpu_flags

    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    for key, multiple in profile.channel_multiples:
        if key != "default" and key in flags:
            return multiple
    return dict(profile.channel_multiples)["default"]


def runtime_version(backend: str) -> str:
    """"<distribution> <version>" of the backend's runtime as installed here (e.g. "onnxruntime 1.20.1"),
    read from the package metadata without importing the runtime; "not installed" where absent."""
    import importlib.metadata

    module = BACKENDS[backend].runtime_modules[0] if BACKENDS[backend].runtime_modules else backend
    distribution = module.split(".")[0]
    try:
        return f"{distribution} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{distribution} not installed"


def target_machine_key(backend: str) -> str:
    """`measure.machine_key` for a target's backend: the CPU alone, or the backend's accelerator
    (`Backend.device_name`) before the host CPU where it runs on one."""
    return machine_key(get_backend(backend).device_name())


def check_input_shape(profile: TargetProfile, shape: tuple[int, ...], what: str) -> None:
    """Raise UserError unless `what` (a package, an ONNX file) takes the profile's input shape (C, H, W).
    The shipped profiles are for Fashion-MNIST's 1x28x28; another input needs its own profile."""
    if tuple(profile.input_shape) == tuple(shape):
        return
    raise UserError(f"target {profile.name} is for inputs {list(profile.input_shape)}; {what} takes {list(shape)}: copy "
                    f"{profile.path or 'the profile'} to a YAML file of your own, give it a new name, set its input_size "
                    f"to {list(shape)} (and, for int8, a calibration set of such images) and pass that file as --target")


def load_target(name_or_path: str | Path) -> TargetProfile:
    """A target profile by path or by name (`x86-ort-fp32`). Raises UserError, one line naming
    the file and the field, for a missing file, bad YAML or a bad field. The file is read
    bounded (fileio.MAX_YAML_BYTES) and without YAML anchors or aliases (an alias bomb is
    refused before any node is built)."""
    file = find_profile(str(name_or_path))
    return parse_profile(read_yaml(file), str(file))
