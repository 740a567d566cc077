# lapp-edge: every target installs what it needs first (venv, Python packages, Fashion-MNIST).
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
LAPP := $(VENV)/bin/lapp-edge
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST := $(FMNIST_DIR)/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DIR := runs/demo
DEMO_RUN := $(DEMO_DIR)/slim
DEMO_MODEL := $(DEMO_DIR)/models/slim

.PHONY: setup data demo test test-slow bench clean

setup: $(VENV)/.installed data

# Versions are pinned by constraints.txt (the exact set a passing `make test` ran with);
# README "Dependencies" says how to update it (tools/update_constraints.py).
$(VENV)/.installed: pyproject.toml runtime/pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[dev,openvino,gpu]' -e ./runtime
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# The whole mission in one command (configs/demo.yaml, ~10 minutes on 2 CPU cores): LAPP-train
# ResNet-20 on Fashion-MNIST to 40% of its FLOPs, shaped for ORT fp32 and OpenVINO f32 speed where this
# CPU has their layer tables (FLOPs alone where not), and the dense baseline, export both as verified
# packages, bench the slim one on every CPU target profile this machine can run with the dense one
# measured side by side; prints per target the accuracy (dense, slim), measured vs predicted latency
# and the speedup, draws accuracy vs latency, and says where the files are. The demo owns runs/demo
# and starts it afresh each time.
demo: setup
	rm -rf $(DEMO_DIR)
	$(LAPP) run-all configs/demo.yaml --out $(DEMO_DIR)

# LAPP_EDGE_REQUIRE_DATA=1: a missing Fashion-MNIST fails the tests instead of skipping them.
# --durations: the 15 slowest tests are listed, so CI's log shows where the suite's time goes (keep it well
# under 15 minutes on a 2-core machine; mark a test `slow` when a faster one in the suite covers its kind).
test: setup
	LAPP_EDGE_REQUIRE_DATA=1 $(PYTHON) -m pytest -q -m "not slow and not latency" --durations=15

# Latency regression per target against this machine's recorded baselines (run on a quiet machine;
# TARGET=NAME for one target; record baselines with `lapp-edge baseline --target NAME`).
.PHONY: latency-test
latency-test: setup
	LAPP_EDGE_LATENCY_TARGET=$(TARGET) $(PYTHON) -m pytest -q -m latency tests/latency

test-slow: setup
	LAPP_EDGE_REQUIRE_DATA=1 $(PYTHON) -m pytest -q -m slow

bench: setup
	$(PYTHON) benchmarks/lapp_vs_dense.py --out bench-results/lapp_vs_dense

# CPU training speed per memory format (benchmarks/memory_format.py): epoch CPU time of dense, LAPP pruning
# and slim epochs with channels_last vs contiguous, per model family, the formats alternating; one thread;
# table and JSON in bench-results/memory-format. About 20 minutes on 2 cores; re-running reuses finished runs.
.PHONY: bench-memory-format
bench-memory-format: setup
	$(PYTHON) benchmarks/memory_format.py --out bench-results/memory-format

# LAPP vs peers at equal FLOPs and epochs (benchmarks/compare.py): dense, uniform widths, Torch-Pruning
# (L1, BN scale, group norm), LAPP and its ablations on Fashion-MNIST ResNet-20, targets 0.3 and 0.5, seeds
# 0 and 1; accuracy, cost, training time and ONNX Runtime latency per method (table, JSON, plots in
# bench-results/compare). Many hours at 30 epochs on 2 cores; a small run:
# make compare COMPARE_ARGS='--flops-targets 0.5 --seeds 0 --epochs 3 --train-subset 5000'. Re-running resumes.
COMPARE_ARGS ?=
.PHONY: compare
compare: setup
	$(PYTHON) benchmarks/compare.py --flops-targets 0.3,0.5 --seeds 0,1 --out bench-results/compare $(COMPARE_ARGS)

# Batch-1 ONNX Runtime CPU latency, fused vs bypass-as-separate-convs, of a finished run that kept its
# bypass (BENCH_RUN=runs/NAME; default: a short LAPP run trained here first with --keep-bypass-after-freeze,
# about 2 minutes, since a default run merges its bypass into its conv at freeze).
BENCH_EXPORT_RUN := runs/bench-export
BENCH_RUN ?= $(BENCH_EXPORT_RUN)
.PHONY: bench-export
bench-export: setup
	@if [ "$(BENCH_RUN)" = "$(BENCH_EXPORT_RUN)" ] && [ ! -f $(BENCH_EXPORT_RUN)/report.json ]; then \
		$(LAPP) train --out $(BENCH_EXPORT_RUN) --epochs 3 --prune-epochs 1 --train-subset 10000 --quiet \
			--keep-bypass-after-freeze $$([ -f $(BENCH_EXPORT_RUN)/config.json ] && echo --resume); fi
	$(PYTHON) benchmarks/export_fused_vs_unfused.py --run $(BENCH_RUN) --out bench-results/export

clean:
	rm -rf $(VENV) runs .pytest_cache

# CPU targets: bench every profile of one runtime on the demo's slim package (compile,
# top-1 vs the fp32 ORT reference on the full test split, latency at batch 1 and 32).
DEMO_PACKAGE := $(DEMO_MODEL)
ORT_TARGETS := x86-ort-fp32 x86-ort-int8
OPENVINO_TARGETS := x86-openvino-f32 x86-openvino-bf16 x86-openvino-int8

.PHONY: ort-cpu openvino

ort-cpu: setup
	$(LAPP) bench $(DEMO_PACKAGE) $(addprefix --target ,$(ORT_TARGETS)) --out bench-results/ort-cpu.json

openvino: setup
	$(LAPP) bench $(DEMO_PACKAGE) $(addprefix --target ,$(OPENVINO_TARGETS)) --out bench-results/openvino.json

# Dense vs slim latency per CPU target (batch 1 and 32; LAPP 40% with channel multiple 8 and 1)
# and int8/bf16 vs fp32 per runtime, all measured interleaved in one process (~10 minutes).
# Inputs: the dense and LAPP runs of `make bench`, and a channel-multiple-1 run trained here.
LATENCY_DENSE_RUN := bench-results/lapp_vs_dense/dense
LATENCY_M8_RUN := bench-results/lapp_vs_dense/lapp
LATENCY_M1_RUN := runs/lapp40-m1
.PHONY: bench-latency
bench-latency: setup models/dense-r20/manifest.json models/lapp40-m8/manifest.json models/lapp40-m1/manifest.json
	$(PYTHON) benchmarks/dense_vs_slim_latency.py --dense models/dense-r20 --slim models/lapp40-m8 \
		--slim models/lapp40-m1 --out bench-results/dense_vs_slim

# How fast can any width allocation of ResNet-20 at 0.40 FLOPs be on each CPU target (the layer tables'
# best, median and worst allocations measured against dense), next to the LAPP runs of `make bench`.
.PHONY: bench-frontier
bench-frontier: setup $(LATENCY_M8_RUN)/report.json
	$(PYTHON) benchmarks/efficiency_frontier.py --flops-target 0.4 --runs $(LATENCY_M8_RUN) --out bench-results/frontier

$(LATENCY_DENSE_RUN)/report.json $(LATENCY_M8_RUN)/report.json:
	$(MAKE) bench

$(LATENCY_M1_RUN)/report.json:
	rm -rf $(LATENCY_M1_RUN)
	$(LAPP) train --model resnet20 --flops-target 0.4 --channel-multiple 1 --epochs 4 --prune-epochs 1 \
		--train-subset 20000 --threads 2 --quiet --out $(LATENCY_M1_RUN)

models/dense-r20/manifest.json: $(LATENCY_DENSE_RUN)/report.json
	rm -rf models/dense-r20
	$(LAPP) export $(LATENCY_DENSE_RUN) --out models/dense-r20

models/lapp40-m8/manifest.json: $(LATENCY_M8_RUN)/report.json
	rm -rf models/lapp40-m8
	$(LAPP) export $(LATENCY_M8_RUN) --out models/lapp40-m8

models/lapp40-m1/manifest.json: $(LATENCY_M1_RUN)/report.json
	rm -rf models/lapp40-m1
	$(LAPP) export $(LATENCY_M1_RUN) --out models/lapp40-m1

# Device bundles: one reproducible archive per CPU target profile for the demo
# model package, in dist/, each with <bundle>.latency.json (expected latency measured here).
# On the device: pip install './runtime[onnxruntime]' (or [openvino]); lapp-edge-run BUNDLE --check
# (docs/SHIP.md).
SHIP_TARGETS := $(ORT_TARGETS) $(OPENVINO_TARGETS)
.PHONY: ship
ship: setup $(DEMO_MODEL)/manifest.json
	$(LAPP) ship $(DEMO_MODEL) $(addprefix --target ,$(SHIP_TARGETS)) --out dist

$(DEMO_MODEL)/manifest.json:
	$(MAKE) demo

# GPU: TensorRT fp16 and int8 engines of the demo slim package (runs/demo/models/slim, from `make demo`): build
# (cached in bench-results/tensorrt-work), top-1 vs the fp32 ONNX Runtime reference on the test
# split, GPU latency as trtexec measures it (docs/GPU.md). Needs an NVIDIA GPU, a CUDA build of
# torch and TensorRT 10/11 (`pip install tensorrt`); without them it prints one line and exits 2.
TENSORRT_TARGETS := gpu-tensorrt-fp16 gpu-tensorrt-int8
.PHONY: tensorrt
tensorrt: setup $(VENV)/.installed-gpu
	$(PYTHON) benchmarks/tensorrt_check.py --package $(DEMO_PACKAGE) $(addprefix --target ,$(TENSORRT_TARGETS)) \
		--out bench-results/tensorrt.json --work-dir bench-results/tensorrt-work

$(VENV)/.installed-gpu: pyproject.toml
	$(PYTHON) -m pip install --quiet -e '.[gpu]'
	touch $@

# GPU check, one call on a machine with an NVIDIA GPU and a CUDA build of torch (no TensorRT, no
# network): dense vs LAPP ResNet-20/56 epoch times (pruning and slim, bypass branch/reparam/none),
# the torch-cuda dense-vs-slim latency table (batch 1 and 256, speedup vs FLOPs speedup) and a
# 2-process DDP run; bench-results/gpu-check/gpu-check.{json,txt}. Without a GPU: one line, exit 2.
# `benchmarks/gpu_check.py --cpu-smoke` runs the same code paths tiny on the CPU (tests/test_gpu_check.py).
.PHONY: gpu-check
gpu-check: setup
	$(PYTHON) benchmarks/gpu_check.py --out bench-results/gpu-check
