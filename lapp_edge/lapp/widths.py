"""Choose hardware-friendly widths at freeze: multiples of `multiple` that land on the
cost target (a `CostModel` ratio: FLOPs today) while staying as close as possible to the widths LAPP learned.

LAPP trains with unrounded kept counts (rounding inside the loop oscillated: one 8-channel
step of an early ResNet stage is ~6% of dense FLOPs). At freeze, each layer's width is
chosen from its allowed values (multiples of `multiple` from `min_width` up, plus the full
width) by a best-improvement local search over single-layer steps and paired steps (one
layer up, another down), minimising lexicographically
  1. how far the cost ratio lies outside `aim` around the target, then
  2. the squared distance, in steps, from the learned widths.
With multiple=1 the same search is the greedy add/drop repair that lands within a channel.

The search is local, so where it ends outside `aim` from the learned widths it is run again
from the end of a search from fixed starts (dense, uniform scalings, the smallest widths), and
where that misses too, from the best of a seeded sample of allocations (`from_sampled_starts`).
Where the cost has latency ceilings (`--land-on-flops`), excess over a ceiling counts into 1,
weighted so heavily that the search first gets under every ceiling, then onto the FLOPs target.
A site whose minimum width is 0 (a removable residual branch, `--block-removal`) may also be
given no channels at all: its branch is then removed.

`target_widths` runs that fixed-start search before training, so a run whose target no
width combination it finds can meet is refused before anything is written, and the freeze
meets the target wherever that check did (a descent that starts on target stays on it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lapp_edge.lapp.cost import CostModel
from lapp_edge.lapp.latency_cost import CEILING_SEARCH_WEIGHT

MinWidths = int | Sequence[int]      # one minimum for every site, or one per site (0: the site may be removed)
SAMPLED_STARTS = 20_000              # allocations scored when the local searches miss the aim (`from_sampled_starts`)
SAMPLED_DESCENTS = 8                 # descents run from the best of them


def allowed_widths(total: int, multiple: int, min_width: int) -> np.ndarray:
    """Widths a site of `total` channels may keep: multiples of `multiple` from `min_width` up, and
    `total`; with `min_width` 0 also 0 (the site removed), then the multiples from one up."""
    multiple = max(1, multiple)
    start = -(-max(1, min_width) // multiple) * multiple  # smallest multiple >= min_width
    values = list(range(start, total + 1, multiple))
    if not values or values[-1] != total:
        values.append(total)
    kept = sorted(set(v for v in values if v >= 1))
    return np.array(([0] if min_width == 0 else []) + kept, dtype=np.int64)


def per_site(min_width: MinWidths, count: int) -> list[int]:
    """`min_width` as one minimum per site (ValueError for a list of another length)."""
    if isinstance(min_width, int):
        return [min_width] * count
    values = [int(v) for v in min_width]
    if len(values) != count:
        raise ValueError(f"{len(values)} minimum widths for {count} sites")
    return values


class _WidthSearch:
    """The local search over one cost model's allowed widths (see the module docstring)."""

    def __init__(self, cost: CostModel, target_ratio: float, multiple: int, min_width: MinWidths, aim: float,
                 max_iterations: int) -> None:
        minimums = per_site(min_width, len(cost.site_channels))
        self.options = [allowed_widths(total, multiple, low) for total, low in zip(cost.site_channels, minimums)]
        self.cost, self.target, self.aim, self.max_iterations = cost, target_ratio, aim, max_iterations
        self.step = float(max(1, multiple))
        self.limits = np.array([len(opts) - 1 for opts in self.options])
        count = len(self.options)
        eye = np.eye(count, dtype=np.int64)
        pair_moves = (eye[:, None, :] - eye[None, :, :]).reshape(-1, count)
        pair_moves = pair_moves[np.abs(pair_moves).sum(axis=1) == 2]
        self.moves = np.concatenate([eye, -eye, pair_moves])

    def widths_of(self, positions: np.ndarray) -> np.ndarray:
        return np.stack([self.options[s][positions[..., s]] for s in range(len(self.options))], axis=-1)

    def objective(self, positions: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        widths = self.widths_of(positions).astype(np.float64)
        excess = np.maximum(0.0, np.abs(self.cost.ratio(widths) - self.target) - self.aim)
        ceiling_excess = getattr(self.cost, "ceiling_excess", None)
        if ceiling_excess is not None:      # latency ceilings (--land-on-flops): nearly hard, see lapp.latency_cost
            excess = excess + CEILING_SEARCH_WEIGHT * ceiling_excess(widths)
        distance = (((widths - reference) / self.step) ** 2).sum(axis=-1)
        return np.round(excess, 12), distance

    def run(self, start: np.ndarray, reference: np.ndarray) -> tuple[tuple[float, float], np.ndarray]:
        """Best-improvement descent from the allowed widths nearest `start`, minimising (excess,
        squared steps from `reference`); returns ((excess, distance), positions)."""
        position = np.array([int(np.abs(opts - u).argmin()) for opts, u in zip(self.options, start)])
        best_excess, best_distance = self.objective(position[None], reference)
        for _ in range(self.max_iterations):
            candidates = position[None] + self.moves
            candidates = candidates[((candidates >= 0) & (candidates <= self.limits)).all(axis=1)]
            if len(candidates) == 0:          # every site has a single allowed width
                break
            excess, distance = self.objective(candidates, reference)
            best = np.lexsort((distance, excess))[0]
            if (excess[best], distance[best]) >= (best_excess[0], best_distance[0]):
                break
            position = candidates[best]
            best_excess, best_distance = excess[best : best + 1], distance[best : best + 1]
        return (float(best_excess[0]), float(best_distance[0])), position

    def from_fixed_starts(self) -> np.ndarray:
        """The search from fixed starts (dense, uniform scalings around the target, smallest), each
        measured against itself: the first end that meets the aim, else the one with least excess."""
        full = np.array([float(opts[-1]) for opts in self.options])
        best: tuple[tuple[float, float], np.ndarray] | None = None
        for scale in (1.0, self.target ** 0.5, self.target, self.target ** 2, 0.0):
            start = np.maximum(full * scale, 1.0)
            result = self.run(start, start)
            if best is None or result[0][0] < best[0][0]:
                best = result
            if best[0][0] == 0:
                break
        assert best is not None
        return best[1]

    def from_sampled_starts(self, reference: np.ndarray, count: int = SAMPLED_STARTS, descents: int = SAMPLED_DESCENTS,
                            seed: int = 0) -> tuple[tuple[float, float], np.ndarray]:
        """Where the local search from the learned widths and from the fixed starts ends outside the aim
        (a FLOPs target under latency ceilings: every single or paired step towards the FLOPs target
        crosses a ceiling), `count` allocations drawn uniformly (seeded) from the allowed widths are
        scored, and the descent runs from the `descents` with the least excess, each measured against
        `reference`; returns the best end ((excess, distance), positions). Measured: a `--keep-blocks 1`
        run's re-plan ended at 0.388 FLOPs under its ceiling while a plan at 0.3995 under it existed
        (docs/RESULTS.md, "Block removal in the table's networks")."""
        rng = np.random.default_rng(seed)
        positions = np.stack([rng.integers(0, limit + 1, count) for limit in self.limits], axis=1)
        excess, _ = self.objective(positions, reference)
        best: tuple[tuple[float, float], np.ndarray] | None = None
        for index in np.argsort(excess, kind="stable")[:descents]:
            result = self.run(self.widths_of(positions[index]).astype(np.float64), reference)
            if best is None or result[0] < best[0]:
                best = result
        assert best is not None
        return best


def choose_widths(
    unrounded: np.ndarray,
    cost: CostModel,
    target_ratio: float,
    multiple: int,
    min_width: MinWidths,
    aim: float = 0.004,
    max_iterations: int = 10_000,
) -> np.ndarray:
    """Widths (int64, one per site) near `unrounded` (learned kept counts, one per site) whose
    cost ratio is within `aim` of `target_ratio` when reachable; otherwise the closest found.
    Where the search from `unrounded` misses the aim, it is run again from the widths
    `target_widths` finds (which meet the aim wherever the check before training passed):
    a descent never raises the excess, so it stays on target and moves towards `unrounded`."""
    if len(cost.site_channels) == 0:
        return np.zeros(0, dtype=np.int64)
    search = _WidthSearch(cost, target_ratio, multiple, min_width, aim, max_iterations)
    unrounded = np.asarray(unrounded, dtype=np.float64)
    result = search.run(unrounded, unrounded)
    if result[0][0] > 0:
        fallback = search.run(search.widths_of(search.from_fixed_starts()).astype(np.float64), unrounded)
        result = min(result, fallback, key=lambda item: item[0])
    if result[0][0] > 0:
        result = min(result, search.from_sampled_starts(unrounded), key=lambda item: item[0])
    return search.widths_of(result[1])


def target_widths(cost: CostModel, target_ratio: float, multiple: int, min_width: MinWidths, aim: float,
                  max_iterations: int = 10_000) -> tuple[np.ndarray, float]:
    """Before training: the widths the freeze's fallback search reaches (from fixed starts, then from
    sampled ones where those miss; knowing nothing learned) and their cost ratio. The freeze meets the aim wherever these do."""
    if len(cost.site_channels) == 0:
        return np.zeros(0, dtype=np.int64), 1.0
    search = _WidthSearch(cost, target_ratio, multiple, min_width, aim, max_iterations)
    positions = search.from_fixed_starts()
    reached = search.widths_of(positions).astype(np.float64)
    if search.objective(positions[None], reached)[0][0] > 0:      # as choose_widths: sampled starts where those miss
        positions = search.from_sampled_starts(reached)[1]
    widths = search.widths_of(positions)
    return widths, float(cost.ratio(widths.astype(np.float64)))


def smallest_cost_ratio(cost: CostModel, multiple: int, min_width: MinWidths) -> float:
    """The cost ratio with every site at its smallest allowed width: the lowest target LAPP can reach."""
    minimums = per_site(min_width, len(cost.site_channels))
    smallest = [int(allowed_widths(c, multiple, low)[0]) for c, low in zip(cost.site_channels, minimums)]
    return float(cost.ratio(np.array(smallest, dtype=np.float64)))


def uniform_widths(cost: CostModel, target_ratio: float, multiple: int, min_width: int, tolerance: float = 0.01,
                   aim: float = 0.004, max_iterations: int = 10_000) -> tuple[np.ndarray, float, float]:
    """A uniformly thinned network at `target_ratio` of the dense cost: every site's width is one
    factor s times its full width, rounded to the nearest allowed width (multiples of `multiple`
    from `min_width` up). Of all factors, the one whose rounded widths come closest to the target
    is taken when it lies within `tolerance`; otherwise (one rounding step of a narrow layer can
    move the cost by several percent) the unrounded widths at the factor that meets the target
    exactly are rounded by the freeze's width search (`choose_widths`, within `aim` where
    reachable, as close to those uniform widths as it can). Returns (widths int64, their cost
    ratio, the factor)."""
    full = np.array([float(c) for c in cost.site_channels])
    if len(full) == 0:
        return np.zeros(0, dtype=np.int64), 1.0, 1.0
    options = [allowed_widths(int(total), multiple, min_width) for total in full]

    def rounded(factor: float) -> np.ndarray:
        return np.array([opts[int(np.abs(opts - factor * total).argmin())] for opts, total in zip(options, full)], dtype=np.int64)

    best: tuple[float, float, np.ndarray] | None = None
    for factor in np.linspace(0.0, 1.0, 1001):
        widths = rounded(float(factor))
        error = abs(float(cost.ratio(widths.astype(np.float64))) - target_ratio)
        if best is None or error < best[0]:
            best = (error, float(factor), widths)
    assert best is not None
    if best[0] <= tolerance:
        return best[2], float(cost.ratio(best[2].astype(np.float64))), best[1]

    def scaled(factor: float) -> np.ndarray:
        return np.minimum(full, np.maximum(full * factor, float(max(1, min_width))))

    low, high = 0.0, 1.0
    for _ in range(60):     # the unrounded cost grows with the factor
        middle = (low + high) / 2
        low, high = (low, middle) if float(cost.ratio(scaled(middle))) > target_ratio else (middle, high)
    factor = (low + high) / 2
    widths = choose_widths(scaled(factor), cost, target_ratio, multiple, min_width, aim, max_iterations)
    return widths, float(cost.ratio(widths.astype(np.float64))), factor
