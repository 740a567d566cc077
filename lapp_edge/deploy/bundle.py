"""Per-target device bundles: one reproducible archive per target profile, run on the device
by the torch-free runner in runtime/ (`lapp-edge-run`, package `lapp_edge_runtime`).

    build_bundle(models/demo, targets/x86-ort-int8.yaml, dist/)
      -> dist/demo-x86-ort-int8.tar.gz              (deterministic bytes)
         dist/demo-x86-ort-int8.tar.gz.latency.json (expected latency measured while building)

The archive holds only what that device needs (docs/SHIP.md has the full format):

    bundle.json           format, target (backend, precision, threads, batch sizes, latency
                          protocol), runtime (module, artifact, settings, inference precision),
                          preprocessing (shape, image mode, mean/std), class names, samples,
                          tolerance, and the sha256 of every other member
    model.onnx            onnxruntime-cpu: the package's fp32 ONNX, or for int8 the U8S8 Q/DQ
                          ONNX of `onnxruntime_cpu.qdq_model` (the backend's own quantization,
                          with 7-bit weights on any build machine: a device without VNNI runs it)
    model.xml, model.bin  openvino-cpu: OpenVINO IR (`ov.save_model`, f32 weights) of the model
                          the backend compiles from: `ov.convert_model` of the ONNX for fp32 and
                          bf16 (the precision is a compile hint, recorded), the NNCF-quantized
                          model of `openvino_cpu.nncf_model` for int8 (or the Q/DQ ONNX's, for
                          a profile whose first int8 route is ort-qdq)
    samples/images.npy    uint8 N x C x H x W: the first SAMPLE_COUNT images of the dataset's test split
    samples/labels.npy    int64 N: their labels
    samples/expected.npy  float32 N x classes: the outputs of the shipped artifact in its runtime,
                          with the recorded settings, on this machine
    expected_latency.json only with `expected_latency_from` (see below)

Reproducibility: members are sorted, with mtime 0, uid/gid 0, mode 0644 and no user names;
gzip's header has mtime 0 and no file name; JSON is written with sorted keys and holds no
time stamp or absolute path; OpenVINO's auto-generated layer names (a process-wide counter)
are renamed by graph position. So the same package, profile, data and library versions on
the same machine give identical bytes (expected outputs come from the build machine's
kernels, so another CPU may differ in the last bits). Measured latency varies from run to
run, so it is not in the archive: it goes to the sidecar `<archive>.latency.json`, which
names the archive's sha256. To pin an expected latency inside the archive (a release
measured once on the reference device), pass `expected_latency_from=` a latency JSON (such
a sidecar); its content is an input, so the archive stays deterministic and no measurement
is made.

Imports the runtimes through the backends (lazily); raises UserError (one line) for a bad
package, profile, data directory or latency file, or a missing runtime.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.deploy.backends import Runner, RunnerInfo
from lapp_edge.deploy.backends.base import import_runtime
from lapp_edge.deploy.measure import LatencyProtocol, LatencyStats, cpu_model, measure_latency
from lapp_edge.deploy.compile import int8_calibration, int8_route
from lapp_edge.deploy.calibration_set import CalibrationSet, normalize_uint8
from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes, atomic_write_json, check_output_location
from lapp_edge.deploy.package import MANIFEST as PACKAGE_MANIFEST
from lapp_edge.deploy.package import ModelPackage, load_package, sha256_of
from lapp_edge.deploy.targets import TargetProfile, check_input_shape, load_target
from lapp_edge.deploy.tolerance import Tolerance

FORMAT = 1
KIND = "lapp-edge-bundle"
LATENCY_KIND = "lapp-edge-bundle-latency"
MANIFEST = "bundle.json"
EXPECTED_LATENCY = "expected_latency.json"
SUFFIX = ".tar.gz"
MAX_BUNDLE_MEMBERS = 256          # a bundle holds ~10 members (model, samples, manifest, int8/OpenVINO files)
SIDECAR_SUFFIX = ".latency.json"
SAMPLE_COUNT = 8
ARCHIVE_MTIME = 0
RUNTIME_MODULES = {"onnxruntime-cpu": "onnxruntime", "openvino-cpu": "openvino"}
IMAGE_MODES = {1: "L", 3: "RGB"}
# (rtol, atol) of the check |y - e| <= atol + rtol * max|e| per sample. fp32: another x86 CPU
# differs by ~1e-6 of max|e| (OpenVINO vs ONNX Runtime here: 1.6e-6). bf16 and int8: a device
# may run other kernels than the build machine (bf16 falls back to f32 without native bf16;
# int8 without VNNI, hence 7-bit weights in every Q/DQ bundle: full 8-bit U8S8 weights saturate
# there); we expect that within a few % of max|e| but have not measured it across machines.
# int8 vs fp32 itself differed by 20-60% of max|e| on a small test model.
# The rule is lapp_edge.deploy.tolerance's (the one every numerical check uses); the runtime
# package applies it on the device from bundle.json.
TOLERANCES = {"fp32": Tolerance(rtol=1e-3, atol=1e-4), "bf16": Tolerance(rtol=0.05, atol=0.01),
              "int8": Tolerance(rtol=0.05, atol=0.01)}
_AUTO_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*_\d+")


@dataclass
class Artifact:
    """The model files for one target and the runtime section of bundle.json."""

    files: dict[str, bytes]
    runtime: dict[str, Any]
    int8: dict[str, Any] = field(default_factory=dict)


def ort_settings(threads: int) -> dict[str, Any]:
    """The onnxruntime session settings of the onnxruntime-cpu backend, by name (for bundle.json)."""
    from lapp_edge.deploy.backends.onnxruntime_cpu import session_options

    options = session_options(threads)
    return {
        "graph_optimization_level": options.graph_optimization_level.name,
        "intra_op_num_threads": int(options.intra_op_num_threads),
        "inter_op_num_threads": int(options.inter_op_num_threads),
        "execution_mode": options.execution_mode.name,
    }


def openvino_config(precision: str, threads: int) -> dict[str, Any]:
    """The compile config of the openvino-cpu backend (`OpenVinoCpu.load`) for `precision`."""
    from lapp_edge.deploy.backends.openvino_cpu import HINTS

    return {"INFERENCE_PRECISION_HINT": HINTS[precision], "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


def canonical_layer_names(model: Any) -> None:
    """Rename OpenVINO's auto-generated layer names (`Type_<global counter>`) by graph position,
    so that the saved IR does not depend on how many models the process built before."""
    for index, op in enumerate(model.get_ordered_ops()):
        name = op.get_friendly_name()
        if _AUTO_NAME.fullmatch(name):
            op.set_friendly_name(f"{name.rsplit('_', 1)[0]}_n{index}")


def make_artifact(package: ModelPackage, profile: TargetProfile, calibration: CalibrationSet | None, work: Path) -> Artifact:
    """The artifact the target's runtime runs, made as its backend makes it (files in memory)."""
    route = int8_route(profile)
    int8: dict[str, Any] = {}
    if calibration is not None:
        definition = calibration.definition
        int8 = {"route": route, "calibration": {"name": definition.name, "dataset": definition.dataset, "split": definition.split,
                                                "count": definition.count, "seed": definition.seed,
                                                "fingerprint": calibration.fingerprint}}
    qdq = None
    if route in ("qdq-u8s8", "ort-qdq"):
        from lapp_edge.deploy.backends.onnxruntime_cpu import qdq_model

        assert calibration is not None
        # 7-bit weights whatever the build CPU: the device's may lack VNNI, where full-range U8S8 saturates
        # (onnxruntime_cpu's docstring; -3.2 points of top-1 measured on the AVX2 EPYC)
        qdq = qdq_model(package.onnx_path, package.input_name, calibration.images, work, reduce_range=True)
        int8["weights_7bit"] = True
    if profile.backend == "onnxruntime-cpu":
        ort = import_runtime("onnxruntime", profile.backend, "'pip install onnxruntime'")
        model_bytes = (qdq or package.onnx_path).read_bytes()
        runtime = {"module": "onnxruntime", "version_at_build": str(ort.__version__), "model": "model.onnx",
                   "settings": ort_settings(profile.threads), "inference_precision": profile.precision}
        return Artifact({"model.onnx": model_bytes}, runtime, int8)

    ov = import_runtime("openvino", profile.backend, "'pip install openvino nncf' (or lapp-edge[openvino])")
    if route == "nncf":
        from lapp_edge.deploy.backends.openvino_cpu import nncf_model

        assert calibration is not None
        model = ov.Core().read_model(str(nncf_model(package.onnx_path, calibration.images, work)))
        import nncf

        int8["nncf_version"] = str(nncf.__version__)
    else:
        model = ov.convert_model(str(qdq or package.onnx_path))
    canonical_layer_names(model)
    xml = work / "ir" / "model.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    runtime = {"module": "openvino", "version_at_build": str(ov.get_version()), "model": "model.xml", "weights": "model.bin",
               "settings": openvino_config(profile.precision, profile.threads), "inference_precision": profile.precision}
    return Artifact({"model.xml": xml.read_bytes(), "model.bin": xml.with_suffix(".bin").read_bytes()}, runtime, int8)


class ArtifactRunner(Runner):
    """The unpacked artifact in its runtime, loaded as the device runner loads it
    (lapp_edge_runtime.engines): recorded settings, OpenVINO at a static batch."""

    def __init__(self, directory: Path, runtime: dict[str, Any], input_name: str, input_shape: tuple[int, int, int],
                 threads: int, batch: int) -> None:
        if runtime["module"] == "onnxruntime":
            from lapp_edge.deploy.backends.onnxruntime_cpu import session_options

            ort = import_runtime("onnxruntime", "onnxruntime-cpu", "'pip install onnxruntime'")
            self.session = ort.InferenceSession(str(directory / runtime["model"]), sess_options=session_options(threads),
                                                providers=["CPUExecutionProvider"])
            self.input_name = input_name
            self.compiled_precision = runtime["inference_precision"]
            version = str(ort.__version__)
        else:
            ov = import_runtime("openvino", "openvino-cpu", "'pip install openvino nncf'")
            core = ov.Core()
            model = core.read_model(str(directory / runtime["model"]))
            model.reshape({model.input(0).get_any_name(): [batch, *input_shape]})
            from lapp_edge.deploy.backends.openvino_cpu import StaticBatchRequest

            self.compiled = core.compile_model(model, "CPU", dict(runtime["settings"]))
            self.static = StaticBatchRequest(self.compiled, input_shape, batch)
            hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            self.compiled_precision = str(hint.to_string() if hasattr(hint, "to_string") else hint)
            version = str(ov.get_version())
        self.info = RunnerInfo(runtime["module"], version, runtime["inference_precision"], self.compiled_precision,
                               threads, batch, model_path=runtime["model"])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W (N <= the batch) -> float32 N x classes."""
        data = np.ascontiguousarray(batch, dtype=np.float32)
        if self.info.backend == "onnxruntime":
            return np.asarray(self.session.run(None, {self.input_name: data})[0], dtype=np.float32)
        return self.static.infer(data)


def _npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
    return stream.getvalue()


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def archive_bytes(members: dict[str, bytes]) -> bytes:
    """A gzip-compressed tar of `members` (name -> bytes) that depends on nothing else:
    sorted names, regular files with mode 0644, mtime 0, uid/gid 0, no user names (ustar);
    gzip header with mtime 0 and no file name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), ARCHIVE_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(members[name]))
    return gzip.compress(buffer.getvalue(), compresslevel=9, mtime=ARCHIVE_MTIME)


def _protocol_dict(protocol: LatencyProtocol) -> dict[str, Any]:
    return {"warmup_iterations": protocol.warmup_iterations, "min_iterations": protocol.min_iterations,
            "min_seconds": float(protocol.min_seconds), "max_seconds": float(protocol.max_seconds)}


def _load_samples(package: ModelPackage, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    from lapp_edge.deploy.bench import load_test_split

    dataset_name = str(package.manifest.get("dataset", ""))
    test = load_test_split(package, data_dir, SAMPLE_COUNT)
    if len(test) < SAMPLE_COUNT:
        raise UserError(f"bundles embed {SAMPLE_COUNT} test images; the {dataset_name} test split has {len(test)}")
    images = test.images[:SAMPLE_COUNT].astype(np.uint8)
    if images.shape[1:] != package.input_shape:
        raise UserError(f"{dataset_name} test images are {list(images.shape[1:])}; {package.name} takes {list(package.input_shape)}")
    return images, test.labels[:SAMPLE_COUNT].astype(np.int64), f"{dataset_name} test split, images 0-{SAMPLE_COUNT - 1}"


def _embedded_latency(path: str | Path, profile: TargetProfile) -> bytes:
    """The latency JSON at `path` as an archive member, if it is for this target and protocol."""
    from lapp_edge.fileio import read_json

    payload = read_json(path)
    if not isinstance(payload, dict) or payload.get("kind") != LATENCY_KIND or not isinstance(payload.get("batches"), list):
        raise UserError(f"{path} is not a bundle latency file (a <bundle>{SIDECAR_SUFFIX} sidecar)")
    if payload.get("target") != profile.name or payload.get("protocol") != _protocol_dict(profile.latency):
        raise UserError(f"{path} was measured for target {payload.get('target')} with protocol {payload.get('protocol')}; "
                        f"{profile.name} uses {_protocol_dict(profile.latency)}")
    payload.pop("bundle_sha256", None)
    payload.pop("bundle", None)
    return _json_bytes(payload)


def measure_bundle_latency(directory: Path, runtime: dict[str, Any], package: ModelPackage, profile: TargetProfile,
                           inputs: np.ndarray) -> list[LatencyStats]:
    """Latency of the unpacked artifact at each profile batch, with the profile's protocol, on
    `inputs` (the normalised samples) tiled to the batch, as `lapp-edge-run --bench` does."""
    results = []
    for batch in profile.batch_sizes:
        runner = ArtifactRunner(directory, runtime, package.input_name, package.input_shape, profile.threads, batch)
        data = np.concatenate([inputs] * -(-batch // len(inputs)), axis=0)[:batch]
        results.append(measure_latency(runner, data, profile.latency))
    return results


def build_bundle(package_dir: str | Path, profile_path: str | Path, out_dir: str | Path, data_dir: str | None = None,
                 expected_latency_from: str | Path | None = None) -> Path:
    """Build `<out_dir>/<package>-<target>.tar.gz` for one target profile and return its path.

    Also writes the measured expected latency to `<archive>.latency.json`, unless
    `expected_latency_from` (a latency JSON for this target and protocol) is given, whose
    content is then embedded in the archive instead. Raises UserError for a tampered or
    missing package, a bad profile or one for a non-CPU backend, an input-shape mismatch,
    missing data or calibration set, or a missing runtime."""
    package = load_package(package_dir)
    profile = load_target(profile_path)
    if profile.backend not in RUNTIME_MODULES:
        raise UserError(f"target {profile.name}: bundles are built for {', '.join(RUNTIME_MODULES)} targets, not {profile.backend}")
    check_input_shape(profile, package.input_shape, package.name)
    channels = package.input_shape[0]
    if channels not in IMAGE_MODES:
        raise UserError(f"{package.name} takes {channels} channels; bundles take 1 (L) or 3 (RGB) channel images")
    manifest = package.manifest
    mean, std = list(manifest["input"]["mean"]), list(manifest["input"]["std"])
    images, labels, source = _load_samples(package, data_dir)
    calibration = int8_calibration(profile, mean, std, data_dir)
    embedded = _embedded_latency(expected_latency_from, profile) if expected_latency_from else None
    name = f"{package.name}-{profile.name}"
    out = Path(out_dir) / f"{name}{SUFFIX}"
    inputs = normalize_uint8(images, mean, std)
    with tempfile.TemporaryDirectory(prefix="lapp-ship-") as temporary:
        work, unpacked = Path(temporary) / "work", Path(temporary) / "bundle"
        artifact = make_artifact(package, profile, calibration, work)
        for member, data in artifact.files.items():
            (unpacked / member).parent.mkdir(parents=True, exist_ok=True)
            (unpacked / member).write_bytes(data)
        runner = ArtifactRunner(unpacked, artifact.runtime, package.input_name, package.input_shape, profile.threads, len(inputs))
        expected = runner.infer(inputs)
        runtime = {**artifact.runtime, "compiled_precision_on_build_cpu": runner.compiled_precision}
        if artifact.int8:
            runtime["int8"] = artifact.int8
        members = dict(artifact.files)
        members["samples/images.npy"] = _npy(images)
        members["samples/labels.npy"] = _npy(labels)
        members["samples/expected.npy"] = _npy(expected.astype(np.float32))
        if embedded is not None:
            members[EXPECTED_LATENCY] = embedded
        bundle_manifest = {
            "format": FORMAT, "kind": KIND, "name": name,
            "target": {"name": profile.name, "backend": profile.backend, "precision": profile.precision,
                       "threads": profile.threads, "batch_sizes": list(profile.batch_sizes),
                       "latency_protocol": _protocol_dict(profile.latency)},
            "runtime": runtime,
            "model": {"family": str(manifest.get("model", "")), "dataset": str(manifest.get("dataset", "")),
                      "package": package.name, "package_manifest_sha256": sha256_of(package.directory / PACKAGE_MANIFEST),
                      "input_name": package.input_name, "output_name": str(manifest["output"]["name"]),
                      "num_classes": int(manifest["output"]["num_classes"])},
            "preprocessing": {"shape": list(package.input_shape), "image_mode": IMAGE_MODES[channels], "layout": "NCHW",
                              "dtype": "float32", "mean": mean, "std": std,
                              "formula": "(pixels / 255 - mean) / std per channel, in float32",
                              "other_size_or_mode": "refused: no resize, no mode conversion"},
            "class_names": list(manifest["class_names"]),
            "samples": {"images": "samples/images.npy", "labels": "samples/labels.npy",
                        "expected_outputs": "samples/expected.npy", "count": len(images), "source": source,
                        "outputs_computed_on": cpu_model()},
            "tolerance": TOLERANCES[profile.precision].to_dict(),
            "expected_latency": EXPECTED_LATENCY if embedded is not None else None,
            "files": {member: hashlib.sha256(data).hexdigest() for member, data in sorted(members.items())},
        }
        members[MANIFEST] = _json_bytes(bundle_manifest)
        data = archive_bytes(members)
        atomic_write_bytes(out, data)
        if embedded is None:
            stats = measure_bundle_latency(unpacked, artifact.runtime, package, profile, inputs)
            atomic_write_json(Path(str(out) + SIDECAR_SUFFIX), {
                "format": FORMAT, "kind": LATENCY_KIND, "bundle": out.name, "bundle_sha256": hashlib.sha256(data).hexdigest(),
                "target": profile.name, "cpu_model": cpu_model(), "runtime": f"{runtime['module']} {runtime['version_at_build']}",
                "compiled_precision": runner.compiled_precision, "threads": profile.threads,
                "protocol": _protocol_dict(profile.latency),
                "batches": [{"batch": s.batch, "median_ms": s.median_ms, "p90_ms": s.p90_ms, "p99_ms": s.p99_ms,
                             "iterations": s.iterations, "seconds": s.seconds} for s in stats],
            })
    return out


def bundled_package_sha256(path: Path) -> str | None:
    """The `package_manifest_sha256` an existing bundle archive records (which package it was built
    from), or None where `path` is not a bundle this tool can read. Reads the archive bounded: at most
    MAX_BUNDLE_MEMBERS member headers, the manifest only (1 MiB at most)."""
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for index, member in enumerate(archive):
                if index >= MAX_BUNDLE_MEMBERS:
                    return None
                if member.name == MANIFEST and member.isfile() and member.size <= 1 << 20:
                    stream = archive.extractfile(member)
                    manifest = json.loads(stream.read(1 << 20)) if stream is not None else None
                    return str(manifest["model"]["package_manifest_sha256"])      # type: ignore[index]
    except (OSError, EOFError, tarfile.TarError, ValueError, KeyError, TypeError):
        return None
    return None


def check_bundle_slot(out: Path, package: ModelPackage, replace: bool = False) -> None:
    """Refuse (UserError) to replace an existing file at a bundle's path unless it is a bundle of this
    very package manifest (shipping the same package again rebuilds it) or `replace` is set: two packages
    with the same folder name would otherwise overwrite each other's bundles silently."""
    if not os.path.lexists(out) or replace:
        return
    recorded = bundled_package_sha256(out) if out.is_file() and not out.is_symlink() else None
    if recorded is None:
        raise UserError(f"--out: {out} exists and is not a bundle lapp-edge can read; remove it, pass --replace or "
                        "choose another --out")
    if recorded != sha256_of(package.directory / PACKAGE_MANIFEST):
        raise UserError(f"--out: {out} holds a bundle built from another package manifest (another package named "
                        f"{package.name}, or this one exported again); pass --replace to replace it, or choose another --out")


def build_bundles(package_dir: str | Path, profile_paths: Sequence[str | Path], out_dir: str | Path,
                  data_dir: str | None = None, expected_latency_dir: str | Path | None = None,
                  replace: bool = False) -> list[Path]:
    """`build_bundle` for each profile. Everything that can refuse is checked for every profile before the
    first bundle is built: the --out location, the profiles and their input shape, the pinned latency files
    (with `expected_latency_dir`, each bundle embeds `<dir>/<archive name>.latency.json`), and that no bundle
    of another package manifest is replaced (unless `replace`)."""
    check_output_location(out_dir, "--out", "dir")
    profiles = [load_target(path) for path in profile_paths]
    package = load_package(package_dir)
    pinned: list[Path | None] = []
    for profile in profiles:
        check_input_shape(profile, package.input_shape, package.name)
        check_bundle_slot(Path(out_dir) / f"{package.name}-{profile.name}{SUFFIX}", package, replace)
        if expected_latency_dir is None:
            pinned.append(None)
            continue
        pinned.append(Path(expected_latency_dir) / f"{package.name}-{profile.name}{SUFFIX}{SIDECAR_SUFFIX}")
        if not pinned[-1].is_file():                                  # type: ignore[union-attr]
            raise UserError(f"no expected latency {pinned[-1]} for target {profile.name}")
    return [build_bundle(package_dir, path, out_dir, data_dir, pin) for path, pin in zip(profile_paths, pinned)]
