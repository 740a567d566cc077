"""The cost model seam: what LAPP constrains, behind one small protocol.

LAPP's penalty, the width rounding at freeze, the reachability check before training and
the report all ask a cost model the same two things: the dense network's cost, and the
cost ratio of a vector of kept counts (one per prunable site). `FlopsCost`
(`lapp_edge.lapp.flops`) is the first implementation (deployed MACs); a latency-table cost
(issue: latency-aware LAPP) is the second. A cost model must:

- take `counts[..., s]` (kept channels of site s) as a torch tensor (soft, differentiable:
  the straight-through kept counts) or a numpy array (integer candidate widths, any leading
  batch shape, evaluated in bulk by the freeze's width search), and
- return the cost (same leading shape) in its own `unit`.

Modelled on NVIDIA Model Optimizer's NAS constraint functions (flops / params / latency
behind one interface), reduced to what LAPP needs.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class CostModel(Protocol):
    """A differentiable cost of the deployed network as a function of kept counts per site."""

    name: str                    # "flops", "latency": what the report calls the constrained quantity
    unit: str                    # e.g. "MACs", "ms"
    site_channels: list[int]     # dense width of every site, in site order
    dense_cost: float            # cost of the dense network (all sites at full width)

    def cost(self, counts: Any) -> Any:
        """Cost for kept counts `counts[..., s]` (torch or numpy); leading shape preserved."""

    def ratio(self, counts: Any) -> Any:
        """cost(counts) / dense_cost."""
