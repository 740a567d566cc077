"""The latency cost model: a target's predicted latency as a differentiable function of kept counts.

The second implementation of `lapp_edge.lapp.cost.CostModel` (FLOPs is the first). For one target
and batch size, with the target's layer table (`costs.latency_table`, measured by
`lapp-edge profile-layers`):

    latency_ms(counts) = dense_ms * f(counts) / f(dense),   f = a + b * S(counts) / S(dense) [+ sum_E c_E * E(counts) / N_E]
    S(counts) = sum over deployed convs l of T_l(c_in_l, c_out_l)
    E = conv MACs, output elements or off-block output elements, where the table's fit kept such terms;
    N_E = the dense network's MACs or output elements (costs.latency_table)

where c_in_l / c_out_l are the kept counts of the sites that prune layer l (or its fixed width)
and T_l is bilinearly interpolated between the table's grid widths. Interpolation is linear in
each count between grid points, so the soft (straight-through) kept counts of training get a
gradient: the slope of the table's cell, which is what tells LAPP that a width step off the
target's block costs more than its FLOPs say. On a grid width (training's kept counts are integers;
every site starts at its full width) the cell is the one below: the slope is what pruning saves.
The ratio (what LAPP's penalty and the width search use) is latency_ms(counts) / latency_ms(dense).

Several targets at once (`TightestBudgetCost`): each target t has its cost ratio r_t and budget
ratio B_t; the combined ratio is min_t(B_t) * max_t(r_t / B_t). It is 1 for the dense network,
reaches min_t(B_t) exactly when the tightest target sits on its budget (the others then lie
within theirs), and its gradient flows to the target that binds. LAPP's target is min_t(B_t).
A member may be any cost model with a ratio: `--max-flops` adds the FLOPs cost with its budget.

FLOPs landed, latency as a ceiling (`FlopsUnderLatencyCeilings`, `--land-on-flops`): the tightest-binding
combination stops pruning at whichever budget binds first, so where the latency budget binds first the
network ends below its FLOPs target, slower per FLOP than it need be (measured on the AMX Xeon: 0.31 FLOPs
at 0.46 of dense latency, docs/RESULTS.md). Landing the FLOPs on its target while each latency stays
under its budget asks LAPP for a different allocation, not a smaller network: the penalty is
    |F - t| + CEILING_WEIGHT * t * max_t relu(L_t / B_t(now) - 1)
whose gradient, while a latency is over its ceiling and the FLOPs under their target, grows the sites
with the least latency per MAC and cuts those with the most. It is the FLOPs target with the latency
tables as a hard side constraint (HALP, Shen et al. 2022, maximises importance under a latency budget
instead; here the FLOPs stay the capacity measure the user asked for).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from lapp_edge.costs.latency_table import (
    EXTRA_FEATURES, BatchTable, LayerTable, dense_normalisers, feature_sums_of, geometry,
)
from lapp_edge.lapp.flops import DeployedLayer


def _torch_axis(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid cell holding `x` and the interpolation weight within it (same values as the numpy
    lookup's). At a grid width the cell is the one below it, so the slope there is the step down to the
    next smaller grid width, the step pruning takes. The weight is bounded with `torch.where`, not
    `clamp`: clamp passes no gradient at its bounds, and training's kept counts are integers that sit on
    grid widths (every site starts at its full width, the top of its grid), so the penalty had no
    gradient there and latency-aware runs left most sites unpruned (docs/RESULTS.md)."""
    if grid.numel() == 1:
        zero = torch.zeros_like(x, dtype=torch.long)
        return zero, zero, torch.zeros_like(x)
    lower = (torch.searchsorted(grid, x.detach().contiguous(), right=False) - 1).clamp(0, grid.numel() - 2)
    raw = (x - grid[lower]) / (grid[lower + 1] - grid[lower])
    # at or below the grid's first width the weight is 0 without a gradient: `_below_grid` holds that slope
    weight = torch.where(raw <= 0, torch.zeros_like(raw), torch.where(raw > 1, torch.ones_like(raw), raw))
    return lower, lower + 1, weight


class _TorchLayer:
    """A layer table as tensors on one device (built on first use)."""

    def __init__(self, table: LayerTable, device: torch.device, dtype: torch.dtype) -> None:
        self.tied = table.tied
        self.grid_in = torch.tensor(table.c_in_grid, device=device, dtype=dtype)
        self.grid_out = torch.tensor(table.c_out_grid, device=device, dtype=dtype)
        self.values = torch.tensor(table.values_ms(), device=device, dtype=dtype)
        self.smallest_in, self.smallest_out = float(table.c_in_grid[0]), float(table.c_out_grid[0])

    def lookup(self, c_in: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
        """As `LayerTable.lookup`: bilinear, clamped above, linear to 0 ms at 0 channels below the grid."""
        o0, o1, wo = _torch_axis(self.grid_out, c_out)
        if self.tied:
            return ((1 - wo) * self.values[0, o0] + wo * self.values[0, o1]) * _below_grid(self.smallest_out, c_out)
        i0, i1, wi = _torch_axis(self.grid_in, c_in)
        return (((1 - wi) * (1 - wo) * self.values[i0, o0] + (1 - wi) * wo * self.values[i0, o1]
                 + wi * (1 - wo) * self.values[i1, o0] + wi * wo * self.values[i1, o1])
                * _below_grid(self.smallest_in, c_in) * _below_grid(self.smallest_out, c_out))


def _below_grid(smallest: float, x: torch.Tensor) -> torch.Tensor:
    """The factor taking a layer linearly to 0 ms at 0 channels below the grid's first width: 1 above it,
    x / smallest at and below it (so at the first width the slope is the step down to 0 channels)."""
    if smallest <= 0:
        return torch.ones_like(x)
    return torch.where(x > smallest, torch.ones_like(x), torch.where(x < 0, torch.zeros_like(x), x / smallest))


class LatencyCost:
    """Predicted latency in ms on one target at one batch, from its layer table (module docstring).

    Raises UserError at construction when the table has no entry for one of the model's convs."""

    name = "latency"
    unit = "ms"

    def __init__(self, layers: list[DeployedLayer], site_channels: list[int], table: BatchTable, target: str) -> None:
        self.target = target
        self.table = table
        self.site_channels = list(site_channels)
        self.entries: list[tuple[LayerTable, DeployedLayer]] = []
        for layer in layers:
            if layer.kind != "conv":
                continue                           # the classifier: in the fitted constant
            signature = layer.signature
            table.sum_ms([(signature, layer.in_fixed, layer.out_fixed)])   # UserError for a shape the table lacks
            self.entries.append((table.layers[signature], layer))
        self.geometries = [geometry(layer.signature) for _, layer in self.entries]
        self._torch: dict[tuple[str, torch.dtype], list[_TorchLayer]] = {}
        dense = np.array(self.site_channels, dtype=np.float64)
        self.dense_sum = float(self.table_sum(dense))
        self.dense_features = dense_normalisers(self.feature_sums(dense))
        self.dense_fitted = float(self.fitted(dense))
        self.dense_cost = float(table.dense_ms)

    def _width(self, counts: Any, site: int | None, fixed: int) -> Any:
        return counts[..., site] if site is not None else fixed

    def table_sum(self, counts: Any) -> Any:
        """Sum of the layer tables for kept counts `counts[..., s]` (torch: differentiable)."""
        if isinstance(counts, torch.Tensor):
            key = (str(counts.device), counts.dtype)
            if key not in self._torch:
                self._torch[key] = [_TorchLayer(t, counts.device, counts.dtype) for t, _ in self.entries]
            total: Any = 0.0
            for torch_layer, (_, layer) in zip(self._torch[key], self.entries):
                c_in = self._width(counts, layer.in_site, layer.in_fixed)
                c_out = self._width(counts, layer.out_site, layer.out_fixed)
                shape = counts.shape[:-1]
                total = total + torch_layer.lookup(torch.as_tensor(c_in, dtype=counts.dtype, device=counts.device).expand(shape),
                                                   torch.as_tensor(c_out, dtype=counts.dtype, device=counts.device).expand(shape))
            return total
        counts = np.asarray(counts, dtype=np.float64)
        total = np.zeros(counts.shape[:-1])
        for table, layer in self.entries:
            c_in = np.broadcast_to(self._width(counts, layer.in_site, layer.in_fixed), counts.shape[:-1])
            c_out = np.broadcast_to(self._width(counts, layer.out_site, layer.out_fixed), counts.shape[:-1])
            total = total + table.lookup(c_in, c_out)
        return total

    def feature_sums(self, counts: Any, names: Iterable[str] = EXTRA_FEATURES) -> dict[str, Any]:
        """The sums of the extra terms `names` (default all: conv MACs, output elements, off-block output
        elements) for kept counts."""
        return feature_sums_of([(shape, self._width(counts, layer.in_site, layer.in_fixed),
                                 self._width(counts, layer.out_site, layer.out_fixed))
                                for shape, (_, layer) in zip(self.geometries, self.entries)], names)

    def fitted(self, counts: Any) -> Any:
        """The table fit's latency ratio a + b * table_ratio (+ c_f * extra feature ratio f), unnormalised."""
        table = self.table
        value = table.constant + table.scale * self.table_sum(counts) / self.dense_sum
        if table.extra:
            sums = self.feature_sums(counts, table.extra)      # only the terms the fit carries
            for name, coefficient in table.extra.items():
                value = value + coefficient * sums[name] / self.dense_features[name]
        return value

    def ratio(self, counts: Any) -> Any:
        """Predicted latency / dense latency on the target (torch: differentiable; numpy: any leading shape)."""
        return self.fitted(counts) / self.dense_fitted

    def cost(self, counts: Any) -> Any:
        return self.dense_cost * self.ratio(counts)


class TightestBudgetCost:
    """Several budgets as one cost: min_t(B_t) * max_t(ratio_t / B_t) (module docstring); the members are
    the targets' latency costs and, with --max-flops, the FLOPs cost. Raises ValueError without one
    budget per member."""

    name = "latency"
    unit = "share of the dense latency on the tightest target"

    def __init__(self, costs: list[Any], budgets: list[float]) -> None:
        if len(costs) != len(budgets) or not costs:
            raise ValueError("one budget ratio per target cost")
        self.costs, self.budgets = costs, budgets
        self.site_channels = costs[0].site_channels
        self.tightest = min(budgets)
        self.dense_cost = 1.0

    def ratio(self, counts: Any) -> Any:
        shares = [cost.ratio(counts) / budget for cost, budget in zip(self.costs, self.budgets)]
        if isinstance(counts, torch.Tensor):
            return self.tightest * torch.stack(shares, dim=-1).max(dim=-1).values
        return self.tightest * np.max(np.stack(shares, axis=-1), axis=-1)

    def cost(self, counts: Any) -> Any:
        return self.ratio(counts)


CEILING_WEIGHT = 4.0    # latency excess over a ceiling weighs 4x a FLOPs miss of the same share in the penalty
CEILING_SEARCH_WEIGHT = 100.0   # in the freeze's width search a ceiling is (nearly) hard: any excess outweighs FLOPs misses


class FlopsUnderLatencyCeilings:
    """The FLOPs cost landed on its target, each target's latency kept under its budget (module
    docstring). `ratio` is the FLOPs ratio (what LAPP lands on, what the report calls the constraint);
    `ceiling_excess` is how far the latency is over its tightest ceiling. Raises ValueError without one
    budget per latency cost."""

    name = "flops"
    unit = "MACs (latency under each target's budget)"

    def __init__(self, flops: Any, costs: list[Any], budgets: list[float]) -> None:
        if len(costs) != len(budgets) or not costs:
            raise ValueError("one budget ratio per target cost")
        self.flops, self.costs, self.budgets = flops, costs, budgets
        self.site_channels = flops.site_channels
        self.dense_cost = flops.dense_cost

    def ratio(self, counts: Any) -> Any:
        return self.flops.ratio(counts)

    def cost(self, counts: Any) -> Any:
        return self.flops.cost(counts)

    def latency_ratio(self, counts: Any) -> Any:
        """The predicted latency on the tightest ceiling's scale, min_t(B_t) * max_t(L_t / B_t) (as
        `TightestBudgetCost.ratio`): what a run's per-epoch line and history show as its latency."""
        return TightestBudgetCost(self.costs, self.budgets).ratio(counts)

    def ceiling_excess(self, counts: Any, scale: float = 1.0) -> Any:
        """max_t relu(L_t(counts) / (B_t * scale) - 1): 0 within every ceiling (torch: differentiable).
        `scale` > 1 loosens every ceiling (the annealed target's share of the final one)."""
        shares = [cost.ratio(counts) / (budget * scale) for cost, budget in zip(self.costs, self.budgets)]
        if isinstance(counts, torch.Tensor):
            return (torch.stack(shares, dim=-1).max(dim=-1).values - 1.0).clamp(min=0.0)
        return np.maximum(np.max(np.stack(shares, axis=-1), axis=-1) - 1.0, 0.0)


def combined_cost(costs: list[Any], budgets: list[float], flops_bound: tuple[Any, float] | None,
                  land_on_flops: bool = False) -> Any:
    """One target's cost as it is, or several budgets (targets, and the FLOPs bound) as `TightestBudgetCost`;
    with `land_on_flops` (needs `flops_bound`) the FLOPs landed under latency ceilings."""
    if land_on_flops:
        if flops_bound is None:
            raise ValueError("land_on_flops needs the FLOPs cost and its target")
        return FlopsUnderLatencyCeilings(flops_bound[0], list(costs), list(budgets))
    members, ratios = list(costs), list(budgets)
    if flops_bound is not None:
        members.append(flops_bound[0])
        ratios.append(flops_bound[1])
    return members[0] if len(members) == 1 else TightestBudgetCost(members, ratios)
