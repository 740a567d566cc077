"""Per-output-channel importance scores, as plain callables over a ConvBN unit.

Scores are computed from the weights every step without gradient: LAPP learns the
thresholds, not the scores (a design choice that the prototype found necessary: gradients
through the scores pushed gamma and W around instead of moving thresholds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lapp_edge.errors import UserError
from lapp_edge.models.units import ConvBN, PrunableSite

Scorer = Callable[[ConvBN], torch.Tensor]


def _filter_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().flatten(1).norm(dim=1)


def bn_weight_norm(unit: ConvBN) -> torch.Tensor:
    """|gamma| * ||W_c||_2, summed over the main and the bypass branch (default)."""
    score = unit.bn.weight.detach().abs() * _filter_norms(unit.conv.weight)
    if unit.bypass_conv is not None and unit.bypass_bn is not None:
        score = score + unit.bypass_bn.weight.detach().abs() * _filter_norms(unit.bypass_conv.weight)
    return score


def weight_l2(unit: ConvBN) -> torch.Tensor:
    """||W_c||_2 of the main branch only (filter-norm pruning, Li et al. 2017)."""
    return _filter_norms(unit.conv.weight)


def bn_gamma(unit: ConvBN) -> torch.Tensor:
    """|gamma| of the main branch only (network slimming, Liu et al. 2017)."""
    return unit.bn.weight.detach().abs()


SCORERS: dict[str, Scorer] = {"bn_weight_norm": bn_weight_norm, "weight_l2": weight_l2, "bn_gamma": bn_gamma}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise UserError(f"unknown scorer '{name}'; choose one of: {', '.join(SCORERS)}")
    return SCORERS[name]


GROUP_REDUCTIONS = ("sum", "max")


def group_score(scorer: Scorer, site: PrunableSite, reduce: str = "sum") -> torch.Tensor:
    """Per-channel score of a (possibly coupled) site from its producers' scores.

    "sum" (default): a residual add sums the producers' outputs channel by channel, so a
    channel's size in the summed tensor is bounded by the sum of each producer's |gamma| * ||W||;
    "max": the channel is as important as its most important producer. Where a site has one
    producer both equal that producer's score."""
    scores = torch.stack([scorer(unit).float() for unit in site.producers])
    if reduce == "sum":
        return scores.sum(0)
    if reduce == "max":
        return scores.max(0).values
    raise UserError(f"unknown group score reduction '{reduce}'; choose one of: {', '.join(GROUP_REDUCTIONS)}")


def standardize(score: torch.Tensor) -> torch.Tensor:
    """z-score within the layer, so every layer's threshold lives on the same scale."""
    return (score - score.mean()) / (score.std() + 1e-12)
