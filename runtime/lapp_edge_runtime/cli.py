"""`lapp-edge-run BUNDLE [IMAGE ...] [--check] [--bench] [--json]`.

    IMAGE ...   classify: the top classes and their probabilities (softmax of the logits)
    --check     every member's sha256 (always verified on opening), then the embedded
                sample images through preprocessing and the runtime, compared with the
                outputs recorded at build time: |y - e| <= atol + rtol * max|e| per sample
    --bench     latency at each of the target's batch sizes with its protocol, compared
                with the expected latency recorded at build time
    --json      one JSON object on stdout instead of text

Any problem (not a bundle, an unsafe or tampered member, a bad image, a missing runtime,
a failed check) is one line on stderr, `lapp-edge-run: error: ...`, and exit code 2.
Exit code 0 otherwise; latency never fails the run (devices differ), it is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from lapp_edge_runtime.bundle import Bundle, RunnerError, open_bundle, printable
from lapp_edge_runtime.engines import infer_all, load_engine
from lapp_edge_runtime.latency import compare, cpu_model, expected_latency, measure, protocol_of, tiled
from lapp_edge_runtime.preprocess import load_image, normalize, softmax

PROG = "lapp-edge-run"
EXIT_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one RunnerError line (exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise RunnerError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Run a lapp-edge device bundle: classify images, check it, measure latency.")
    parser.add_argument("bundle", help="the bundle archive (.tar or .tar.gz) built for this device's target")
    parser.add_argument("images", nargs="*", help="images to classify (mode and size as the bundle says; no resize)")
    parser.add_argument("--check", action="store_true", help="verify hashes and the embedded samples against the build's outputs")
    parser.add_argument("--bench", action="store_true", help="measure latency with the target's protocol; compare with the expected")
    parser.add_argument("--expected-latency", metavar="FILE", default=None,
                        help="expected latency JSON to compare with (default: the bundle's, or <bundle>.latency.json beside it)")
    parser.add_argument("--top", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def _inputs(bundle: Bundle, uint8_images: np.ndarray) -> np.ndarray:
    spec = bundle.manifest["preprocessing"]
    return normalize(uint8_images, spec["mean"], spec["std"])


def run_check(bundle: Bundle) -> dict[str, Any]:
    """Run the embedded samples and compare with the recorded outputs; raise RunnerError on a mismatch."""
    images, labels, expected = bundle.samples()
    tolerance = bundle.manifest["tolerance"]
    rtol, atol = float(tolerance["rtol"]), float(tolerance["atol"])
    engine = load_engine(bundle, len(images))
    outputs = infer_all(engine, _inputs(bundle, images))
    allowed = atol + rtol * np.abs(expected).max(axis=1, keepdims=True)
    error = np.abs(outputs.astype(np.float64) - expected)
    if not np.all(np.isfinite(outputs)):
        raise RunnerError("check failed: the runtime returned non-finite outputs for the embedded samples")
    ratio = error / allowed
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    if ratio[worst] > 1.0:
        raise RunnerError(
            f"check failed: sample {worst[0]} output {worst[1]} is {outputs[worst]:.6g}, the build recorded "
            f"{expected[worst]:.6g} (|diff| {error[worst]:.3g} > allowed {allowed[worst[0], 0]:.3g} = {atol:g} + {rtol:g} * max|expected|) "
            f"on {engine.description}")
    runtime = bundle.runtime
    return {
        "ok": True,
        "files_verified": len(bundle.manifest["files"]),
        "samples": len(images),
        "tolerance": {"rtol": rtol, "atol": atol, "rule": "|y - e| <= atol + rtol * max|e| per sample"},
        "max_abs_error": float(error.max()),
        "worst_fraction_of_allowed": float(ratio[worst]),
        "top1_agrees_with_build": int((outputs.argmax(1) == expected.argmax(1)).sum()),
        "top1_correct": int((outputs.argmax(1) == labels).sum()),
        "runtime": engine.description,
        "built_with": f"{runtime['module']} {runtime.get('version_at_build', '?')} on {bundle.manifest['samples'].get('outputs_computed_on', '?')}",
    }


def classify(bundle: Bundle, paths: Sequence[str], top: int) -> list[dict[str, Any]]:
    """Predictions for every image: class, probability, the `top` classes and all probabilities."""
    pixels = np.stack([load_image(path, bundle.input_shape) for path in paths])    # every image checked first
    batch = min(len(pixels), max(bundle.manifest["target"]["batch_sizes"]))
    probabilities = softmax(infer_all(load_engine(bundle, batch), _inputs(bundle, pixels)))
    names = bundle.class_names
    if probabilities.ndim != 2 or probabilities.shape[1] != len(names):
        raise RunnerError(f"the bundle's model outputs {list(probabilities.shape[1:])} scores per image but names "
                          f"{len(names)} classes: rebuild it (lapp-edge ship) from a package whose model matches its data")
    predictions = []
    for path, row in zip(paths, probabilities):
        order = np.argsort(-row, kind="stable")
        predictions.append({
            "image": str(path), "class": names[int(order[0])], "index": int(order[0]), "probability": float(row[order[0]]),
            "top": [{"class": names[int(i)], "index": int(i), "probability": float(row[i])} for i in order[:top]],
            "probabilities": [float(p) for p in row],
        })
    return predictions


def bench(bundle: Bundle, expected_file: str | None) -> dict[str, Any]:
    """Latency at each target batch size with the bundle's protocol, beside the expected latency."""
    expected, source = expected_latency(bundle, expected_file)
    protocol = protocol_of(bundle)
    samples = _inputs(bundle, bundle.samples()[0])
    rows = []
    description = ""
    for batch in bundle.manifest["target"]["batch_sizes"]:
        engine = load_engine(bundle, batch)
        description = engine.description
        stats = measure(engine, tiled(samples, batch), protocol)
        rows.append({**stats.__dict__, "versus_expected": compare(stats, expected)})
    return {"cpu_model": cpu_model(), "runtime": description, "protocol": protocol.__dict__,
            "expected_source": source, "expected": expected, "batches": rows}


def _format_check(check: dict[str, Any]) -> str:
    t = check["tolerance"]
    return (f"check ok: {check['files_verified']} files match their sha256; {check['samples']} samples match the build's "
            f"outputs within |y - e| <= {t['atol']:g} + {t['rtol']:g} * max|e| (max |diff| {check['max_abs_error']:.3g}, "
            f"{100 * check['worst_fraction_of_allowed']:.1f}% of allowed); top-1 {check['top1_correct']}/{check['samples']} "
            f"correct vs labels; ran on {check['runtime']}; built with {check['built_with']}")


def _format_prediction(prediction: dict[str, Any]) -> str:
    others = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in prediction["top"][1:])
    return f"{prediction['image']}: {prediction['class']} {prediction['probability']:.3f}" + (f" ({others})" if others else "")


def _format_bench(result: dict[str, Any]) -> list[str]:
    p = result["protocol"]
    lines = [f"bench on {result['cpu_model']}, {result['runtime']}: warm-up {p['warmup_iterations']}, then >= "
             f"{p['min_iterations']} iterations and >= {p['min_seconds']:g} s (max {p['max_seconds']:g} s); "
             f"expected latency: {result['expected_source']}"]
    for row in result["batches"]:
        lines.append(f"  batch {row['batch']:3d}: median {row['median_ms']:.3f} ms, p90 {row['p90_ms']:.3f} ms, "
                     f"p99 {row['p99_ms']:.3f} ms, {row['throughput_ips']:.0f} img/s over {row['iterations']} iterations; "
                     f"{row['versus_expected']}")
    return lines


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, do the work, print the result; raises RunnerError on any problem."""
    args = build_parser().parse_args(argv)
    if not (args.images or args.check or args.bench):
        raise RunnerError("nothing to do: give images to classify, --check or --bench")
    if args.top <= 0:
        raise RunnerError("--top must be a positive integer")
    with tempfile.TemporaryDirectory(prefix="lapp-edge-run-") as directory:
        bundle = open_bundle(args.bundle, directory)
        result: dict[str, Any] = {"bundle": bundle.name, "target": bundle.manifest["target"]["name"]}
        if args.check:
            result["check"] = run_check(bundle)
        if args.images:
            result["predictions"] = classify(bundle, args.images, args.top)
        if args.bench:
            result["bench"] = bench(bundle, args.expected_latency)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    lines = [f"bundle {result['bundle']} (target {result['target']})"]
    if "check" in result:
        lines.append(_format_check(result["check"]))
    lines.extend(_format_prediction(p) for p in result.get("predictions", []))
    if "bench" in result:
        lines.extend(_format_bench(result["bench"]))
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lapp-edge-run`: exit 0, or 2 with one line on stderr."""
    try:
        return run(argv)
    except RunnerError as error:
        print(f"{PROG}: error: {printable(str(error).strip()) or type(error).__name__}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return EXIT_ERROR
