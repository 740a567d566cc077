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
"""

from __future__ import annotations

import numpy as np

from lapp_edge.lapp.cost import CostModel


def allowed_widths(total: int, multiple: int, min_width: int) -> np.ndarray:
    """Widths a site of `total` channels may keep: multiples of `multiple` from `min_width` up, and `total`."""
    multiple = max(1, multiple)
    start = -(-max(1, min_width) // multiple) * multiple  # smallest multiple >= min_width
    values = list(range(start, total + 1, multiple))
    if not values or values[-1] != total:
        values.append(total)
    return np.array(sorted(set(v for v in values if v >= 1)), dtype=np.int64)


def choose_widths(
    unrounded: np.ndarray,
    cost: CostModel,
    target_ratio: float,
    multiple: int,
    min_width: int,
    aim: float = 0.004,
    max_iterations: int = 10_000,
) -> np.ndarray:
    """Widths (int64, one per site) near `unrounded` (learned kept counts, one per site) whose
    cost ratio is within `aim` of `target_ratio` when reachable; otherwise the closest found."""
    options = [allowed_widths(total, multiple, min_width) for total in cost.site_channels]
    site_count = len(options)
    if site_count == 0:
        return np.zeros(0, dtype=np.int64)
    step = float(max(1, multiple))
    unrounded = np.asarray(unrounded, dtype=np.float64)
    position = np.array([int(np.abs(opts - u).argmin()) for opts, u in zip(options, unrounded)])
    limits = np.array([len(opts) - 1 for opts in options])

    def widths_of(positions: np.ndarray) -> np.ndarray:
        return np.stack([options[s][positions[..., s]] for s in range(site_count)], axis=-1)

    def objective(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        widths = widths_of(positions).astype(np.float64)
        excess = np.maximum(0.0, np.abs(cost.ratio(widths) - target_ratio) - aim)
        distance = (((widths - unrounded) / step) ** 2).sum(axis=-1)
        return np.round(excess, 12), distance

    eye = np.eye(site_count, dtype=np.int64)
    pair_moves = (eye[:, None, :] - eye[None, :, :]).reshape(-1, site_count)
    pair_moves = pair_moves[np.abs(pair_moves).sum(axis=1) == 2]
    moves = np.concatenate([eye, -eye, pair_moves])

    best_excess, best_distance = objective(position[None])
    for _ in range(max_iterations):
        candidates = position[None] + moves
        valid = ((candidates >= 0) & (candidates <= limits)).all(axis=1)
        candidates = candidates[valid]
        excess, distance = objective(candidates)
        order = np.lexsort((distance, excess))
        best = order[0]
        if (excess[best], distance[best]) >= (best_excess[0], best_distance[0]):
            break
        position = candidates[best]
        best_excess, best_distance = excess[best : best + 1], distance[best : best + 1]
    return widths_of(position)


def smallest_cost_ratio(cost: CostModel, multiple: int, min_width: int) -> float:
    """The cost ratio with every site at its smallest allowed width: the lowest target LAPP can reach."""
    smallest = [int(allowed_widths(c, multiple, min_width)[0]) for c in cost.site_channels]
    return float(cost.ratio(np.array(smallest, dtype=np.float64)))
