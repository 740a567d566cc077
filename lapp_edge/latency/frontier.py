"""The latency-efficiency frontier at a FLOPs ratio: how fast can any width allocation be?

"FLOPs went down, latency did not" has two causes that call for different fixes: the widths a
pruner chose (another allocation of the same FLOPs would be faster) and the hardware (no
allocation of those FLOPs is faster: fixed per-layer costs, narrow layers that fill the
kernels' blocks badly). This module separates them. Over every width allocation the prunable
sites allow (multiples of the channel multiple, `lapp.widths.allowed_widths`) whose FLOPs ratio
lies in a band around a target, it ranks allocations by their efficiency on each target,

    efficiency = FLOPs ratio / latency ratio   (= measured speedup / FLOPs speedup)

with latency predicted by the target's layer table (`lapp.latency_cost.LatencyCost`), and picks
the allocations a benchmark then measures: the table's best (highest worst-case efficiency over
the targets), its median and its worst. `benchmarks/efficiency_frontier.py` measures them and a
run's own widths on the target, interleaved against the dense network.

The enumeration is exhaustive where the allocations number at most `limit` (ResNet-20 with
coupled groups at multiple 8: 2^4 * 4^4 * 8^4 = 16.8 M, about a minute on one core) and a seeded
uniform sample of `limit` allocations otherwise (MobileNetV2 has 25 groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from lapp_edge.lapp.cost import CostModel
from lapp_edge.lapp.widths import MinWidths, allowed_widths, per_site

DEFAULT_LIMIT = 20_000_000
CHUNK = 1 << 19


@dataclass
class Allocation:
    """One width allocation: widths per site (site order), its FLOPs ratio, and per target the
    latency ratio the target's table predicts (both ratios to the dense network)."""

    widths: list[int]
    flops_ratio: float
    predicted: dict[str, float]

    def predicted_efficiency(self, target: str) -> float:
        """FLOPs ratio / predicted latency ratio on `target` (1.0: latency falls exactly with FLOPs)."""
        return self.flops_ratio / self.predicted[target]


@dataclass
class FrontierScan:
    """What the scan saw: how many allocations there are, how many were evaluated (all, or a
    sample), how many fell in the FLOPs band, and per target the predicted efficiency's quantiles
    over the band (min, p10, median, p90, max)."""

    total: int
    evaluated: int
    exhaustive: bool
    in_band: int
    band: tuple[float, float]
    quantiles: dict[str, list[float]]
    picks: dict[str, Allocation]     # "best", "median", "worst" by the worst target's predicted efficiency


def allocation_count(options: list[np.ndarray]) -> int:
    """Number of width allocations: the product of each site's option count (exact Python int)."""
    return math.prod(len(o) for o in options)


def _positions(options: list[np.ndarray], limit: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of option indices, `[n, sites]` int64: every allocation in mixed-radix order where
    there are at most `limit`, else `limit` drawn uniformly (seeded, with replacement)."""
    sizes = np.array([len(o) for o in options], dtype=np.int64)
    total = allocation_count(options)
    if total <= limit:
        strides = np.ones(len(sizes), dtype=np.int64)
        for i in range(len(sizes) - 2, -1, -1):
            strides[i] = strides[i + 1] * sizes[i + 1]
        for start in range(0, total, CHUNK):
            index = np.arange(start, min(total, start + CHUNK), dtype=np.int64)
            yield (index[:, None] // strides[None, :]) % sizes[None, :]
        return
    rng = np.random.default_rng(seed)
    for start in range(0, limit, CHUNK):
        count = min(CHUNK, limit - start)
        yield np.stack([rng.integers(0, size, count) for size in sizes], axis=1)


def scan_frontier(flops: CostModel, latency: dict[str, CostModel], flops_target: float, band: float, multiple: int,
                  min_width: MinWidths = 1, limit: int = DEFAULT_LIMIT, seed: int = 0) -> FrontierScan:
    """Rank the width allocations whose FLOPs ratio lies within `band` of `flops_target` by their
    predicted efficiency on each target of `latency` (target name -> its latency cost, same sites
    as `flops`). Raises ValueError for no targets, a band of 0 or less, or no allocation in the
    band (the caller says which target and band in its own words). `min_width`: one minimum, or
    one per site (0 lets a removable residual branch go, `--block-removal`)."""
    if not latency:
        raise ValueError("no target to rank allocations on")
    if band <= 0:
        raise ValueError(f"band {band} must be above 0")
    minimums = per_site(min_width, len(flops.site_channels))
    options = [allowed_widths(c, multiple, low) for c, low in zip(flops.site_channels, minimums)]
    total = allocation_count(options)
    low, high = flops_target - band, flops_target + band
    kept: list[np.ndarray] = []
    evaluated = 0
    for positions in _positions(options, limit, seed):
        widths = np.stack([options[s][positions[:, s]] for s in range(len(options))], axis=1).astype(np.float64)
        evaluated += len(widths)
        ratios = flops.ratio(widths)
        inside = (ratios >= low) & (ratios <= high)
        if inside.any():
            kept.append(widths[inside])
    if not kept:
        raise ValueError(f"no allocation with widths in multiples of {multiple} has a FLOPs ratio in [{low:.4f}, {high:.4f}]")
    band_widths = np.concatenate(kept)
    if total > limit:                     # a sample (with replacement) may draw an allocation twice
        band_widths = np.unique(band_widths, axis=0)
    flops_ratios = np.asarray(flops.ratio(band_widths), dtype=np.float64)
    predicted = {name: np.asarray(cost.ratio(band_widths), dtype=np.float64) for name, cost in latency.items()}
    efficiency = {name: flops_ratios / ratio for name, ratio in predicted.items()}
    worst_case = np.min(np.stack(list(efficiency.values()), axis=1), axis=1)
    order = np.argsort(worst_case, kind="stable")

    def allocation(i: int) -> Allocation:
        return Allocation([int(w) for w in band_widths[i]], float(flops_ratios[i]),
                          {name: float(ratio[i]) for name, ratio in predicted.items()})

    picks = {"best": allocation(int(order[-1])), "median": allocation(int(order[len(order) // 2])),
             "worst": allocation(int(order[0]))}
    quantiles = {name: [float(q) for q in np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])] for name, values in efficiency.items()}
    return FrontierScan(total, evaluated, total <= limit, len(band_widths), (low, high), quantiles, picks)
