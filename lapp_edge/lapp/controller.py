"""The LAPP controller: thresholds, straight-through masks, the cost penalty and freeze.

It sets each prunable unit's (and follower's) `channel_mask`, which ConvBN applies inside
BatchNorm's affine transform, and clears them at freeze: the slim model it leaves behind
is the plain model class with fewer channels and no masks.

Per prunable layer l with z-scored channel scores s (no gradient):
    hard mask   m = 1[s > t_l]                     (used in the forward pass)
    surrogate   q = sigmoid((s - t_l) / tau)        (its gradient is used in backward)
    mask        m + (q - stop_grad(q))              (straight-through)
    kept count  sum(m) + (sum(q) - stop_grad(sum(q)))
The cost of the masked network is computed from the kept counts by a cost model
(`lapp_edge.lapp.cost.CostModel`; FLOPs today), and
loss = task + penalty_weight * |cost / cost_dense - target(step)|
(plus the excess over latency ceilings where the cost has them: `lapp.latency_cost`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from lapp_edge.lapp.cost import CostModel
from lapp_edge.lapp.latency_cost import CEILING_WEIGHT
from lapp_edge.lapp.schedule import annealed_target
from lapp_edge.lapp.scores import get_scorer, group_score, standardize
from lapp_edge.models.slicing import consumer_input_weights, slim_site
from lapp_edge.lapp.widths import choose_widths
from lapp_edge.models.units import PrunableSite


@dataclass
class LappConfig:
    """LAPP's own settings. `target` is the kept share of the cost model's dense cost."""

    target: float = 0.4
    channel_multiple: int = 8
    tau: float = 0.5                 # sigmoid temperature, in score standard deviations
    threshold_init: float = -2.0     # initial threshold (z units); lowered further so nothing starts pruned
    threshold_lr: float = 0.02       # Adam, no weight decay
    penalty_weight: float = 10.0
    anneal_fraction: float = 0.75    # share of the pruning steps over which the target anneals
    min_channels: int = 1            # never keep fewer channels than this (or one multiple) in a layer
    max_pruning_ratio: float = 1.0   # every site keeps at least ceil((1 - this) * its channels) (1.0: no such floor)
    scorer: str = "bn_weight_norm"
    group_reduce: str = "sum"        # how a coupled group's channel score combines its producers' (sum | max)
    tolerance: float = 0.01          # the slim network must land within +-tolerance of the target ratio
    shared_threshold: bool = False   # ablation: one threshold (z units) for every site instead of one per site
    block_removal: bool = False      # sites with a `removal` (residual branches) may keep zero channels
    keep_blocks: int = 0             # with block_removal: the first N branches of each stage are never removed

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def minimum_words(self, ratio_name: str) -> str:
        """The smallest width a site may keep, in words for an unreachable target's message: "8 channels", and
        with a share floor ", at least 0.25 of each group's with `ratio_name` 0.75" (`ratio_name`: how the
        caller spells max_pruning_ratio, the CLI flag or the Python argument)."""
        words = f"{self.channel_multiple} channels"
        if self.max_pruning_ratio < 1:
            words += f", at least {1 - self.max_pruning_ratio:g} of each group's with {ratio_name} {self.max_pruning_ratio:g}"
        return words


@dataclass
class FreezeResult:
    """The widths chosen at freeze, the channels kept per site, and the cost ratio they give."""

    widths: dict[str, int]
    keep_indices: dict[str, list[int]]
    unrounded: dict[str, int]
    readded: dict[str, int]          # channels kept at freeze that were masked off (re-enter as no-ops)
    cost_ratio: float


def site_min_widths(sites: list[PrunableSite], config: LappConfig) -> list[int]:
    """Per site, the fewest channels it may keep: 0 for a removable site (`PrunableSite.removal`)
    when `config.block_removal`, unless it is among the first `config.keep_blocks` branches of its
    stage (`PrunableSite.branch_index`), else the larger of `config.min_channels` (at least 1) and
    ceil((1 - `config.max_pruning_ratio`) * the site's channels) (Torch-Pruning's name for the same
    guard against a layer's collapse), at most the site's channels. The width search rounds a
    minimum up to the channel multiple (`widths.allowed_widths`)."""
    base = max(1, config.min_channels)
    minimums = []
    for site in sites:
        if config.block_removal and site.removal is not None and site.branch_index >= config.keep_blocks:
            minimums.append(0)
            continue
        share_floor = math.ceil(round((1.0 - config.max_pruning_ratio) * site.channels, 9))
        minimums.append(min(site.channels, max(base, share_floor)))
    return minimums


class LappController(nn.Module):
    """One learnable threshold per prunable site (a parameter of this module, so DDP and
    optimizers see it), the masks it sets on the units, and the cost penalty. With
    `config.shared_threshold` the parameter holds one threshold, broadcast to every site."""

    def __init__(self, sites: list[PrunableSite], cost: CostModel, config: LappConfig) -> None:
        super().__init__()
        self.sites = sites
        self.cost = cost
        self.config = config
        self.scorer = get_scorer(config.scorer)
        # per site, the fewest channels the freeze may keep (0 where the site may be removed); fixed for the run
        self.min_widths = site_min_widths(sites, config)
        count = 1 if config.shared_threshold else len(sites)
        self.thresholds = nn.Parameter(torch.full((count,), float(config.threshold_init)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.kept: torch.Tensor | None = None
        self.last_scores: list[torch.Tensor] = []

    # --- masks on the units ------------------------------------------------------------
    def _set_mask(self, index: int, mask: torch.Tensor | None) -> None:
        site = self.sites[index]
        for unit in site.units:
            unit.channel_mask = mask

    def detach_masks(self) -> None:
        for index in range(len(self.sites)):
            self._set_mask(index, None)

    # --- masks -------------------------------------------------------------------------
    def site_thresholds(self) -> torch.Tensor:
        """One threshold per site (the shared one broadcast, with its gradient, where there is one)."""
        return self.thresholds.expand(len(self.sites)) if self.config.shared_threshold else self.thresholds

    def _fit(self, values: torch.Tensor) -> torch.Tensor:
        """Per-site bounds as the parameter's shape: the lowest of them for a shared threshold."""
        return values.min().reshape(1) if self.config.shared_threshold else values

    def scores(self) -> list[torch.Tensor]:
        return [standardize(group_score(self.scorer, site, self.config.group_reduce).float()) for site in self.sites]

    def _min_keep(self, index: int, channels: int) -> int:
        """The channels site `index` keeps active while training: 0 where it may be removed, else
        its minimum width, at least one channel multiple."""
        if self.min_widths[index] == 0:
            return 0
        return min(channels, max(self.min_widths[index], self.config.channel_multiple))


    def update_masks(self, with_grad: bool = True) -> torch.Tensor:
        """Recompute every layer's mask from the current weights and thresholds; returns
        the kept counts (straight-through: hard values, surrogate gradient)."""
        scores = self.scores()
        self.last_scores = scores
        if not bool(self.initialized):
            with torch.no_grad():
                lowest = torch.stack([s.min() for s in scores]).to(self.thresholds.device)
                self.thresholds.copy_(torch.minimum(self.thresholds, self._fit(lowest - 0.25)))
                self.initialized.fill_(True)
        kept = []
        thresholds = self.site_thresholds()
        for index, score in enumerate(scores):
            threshold = thresholds[index].to(score.device)
            hard = (score > threshold).to(score.dtype)
            if with_grad:
                soft = torch.sigmoid((score - threshold) / self.config.tau)
                soft_sum = soft.sum()
                # (x - x.detach()) is exactly 0 forward and carries x's gradient backward
                self._set_mask(index, hard + (soft - soft.detach()))
                kept.append(hard.sum() + (soft_sum - soft_sum.detach()))
            else:
                self._set_mask(index, hard)
                kept.append(hard.sum())
        self.kept = torch.stack([k.to(self.thresholds.device) for k in kept])
        return self.kept

    def cost_ratio(self) -> torch.Tensor:
        """Cost ratio of the current soft kept counts (a 0-d tensor with gradient to the thresholds)."""
        assert self.kept is not None, "update_masks first"
        return self.cost.ratio(self.kept)

    def penalty(self, target_now: float) -> torch.Tensor:
        """penalty_weight * |cost ratio - target_now| (0-d tensor); for a cost with latency ceilings
        (`FlopsUnderLatencyCeilings`, --land-on-flops) plus penalty_weight * CEILING_WEIGHT * target_now *
        the excess over the ceilings, loosened by target_now / target as the target anneals."""
        value = (self.cost_ratio() - target_now).abs()
        ceiling_excess = getattr(self.cost, "ceiling_excess", None)
        if ceiling_excess is not None:
            assert self.kept is not None
            value = value + CEILING_WEIGHT * target_now * ceiling_excess(self.kept, target_now / self.config.target)
        return self.config.penalty_weight * value

    def target_at(self, step: int, prune_steps: int) -> float:
        """The annealed cost target at `step` of a pruning phase of `prune_steps` steps."""
        return annealed_target(step, prune_steps, self.config.target, self.config.anneal_fraction)

    @torch.no_grad()
    def clamp_thresholds(self) -> None:
        """Keep every threshold just below its layer's k-th largest score (k = min keep),
        so no layer collapses or loses its gradient."""
        caps = []
        for index, score in enumerate(self.last_scores or self.scores()):
            k = self._min_keep(index, score.numel())
            # a removable site may mask every channel, but its threshold stays within reach of its best
            # channel (4 temperatures: the sigmoid still passes a gradient) so the branch can come back
            caps.append(score.topk(k).values[-1] - 1e-3 if k > 0 else score.max() + 4 * self.config.tau)
        # one tensor op, no host round-trip per layer (matters on a GPU)
        self.thresholds.copy_(torch.minimum(self.thresholds, self._fit(torch.stack(caps).to(self.thresholds.device))))

    def hard_counts(self) -> list[int]:
        with torch.no_grad():
            thresholds = self.site_thresholds()
            return [int((s > thresholds[i].to(s.device)).sum()) for i, s in enumerate(self.scores())]

    # --- freeze ------------------------------------------------------------------------
    @torch.no_grad()
    def plan_freeze(self) -> FreezeResult:
        """Round the learned widths to the channel multiple so the cost target is met,
        and pick each layer's channels by score."""
        scores = self.scores()
        unrounded = np.array(self.hard_counts(), dtype=np.float64)
        widths = choose_widths(
            unrounded, self.cost, self.config.target, self.config.channel_multiple,
            self.min_widths, aim=self.config.tolerance * 0.4,
        )
        keep_indices: dict[str, list[int]] = {}
        readded: dict[str, int] = {}
        for index, (site, score) in enumerate(zip(self.sites, scores)):
            keep = score.topk(int(widths[index])).indices.sort().values
            active = score > self.site_thresholds()[index].to(score.device)
            keep_indices[site.name] = keep.tolist()
            readded[site.name] = int((~active[keep]).sum())
        return FreezeResult(
            widths={s.name: int(w) for s, w in zip(self.sites, widths)},
            keep_indices=keep_indices,
            unrounded={s.name: int(u) for s, u in zip(self.sites, unrounded)},
            readded=readded,
            cost_ratio=float(self.cost.ratio(widths.astype(np.float64))),
        )

    @torch.no_grad()
    def apply_final_masks(self, plan: FreezeResult, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Fix the masks to the planned channels. Channels that come back (kept now but
        masked off during training) re-enter as exact no-ops: their outgoing weights, and
        the optimizer's momentum for those weights, are zeroed."""
        scores = self.scores()
        for index, site in enumerate(self.sites):
            keep = torch.tensor(plan.keep_indices[site.name], dtype=torch.long, device=scores[index].device)
            active = scores[index] > self.site_thresholds()[index].to(scores[index].device)
            returning = keep[~active[keep]]
            if len(returning):
                for consumer in site.consumers:
                    for weight in consumer_input_weights(consumer):
                        weight[:, returning.to(weight.device)] = 0.0
                        state = optimizer.state.get(weight) if optimizer is not None else None
                        for value in (state or {}).values():
                            if torch.is_tensor(value) and value.shape == weight.shape:
                                value[:, returning.to(value.device)] = 0.0
            mask = torch.zeros_like(scores[index])
            mask[keep] = 1.0
            self._set_mask(index, mask)

    @torch.no_grad()
    def slim(self, plan: FreezeResult, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the pruned channels physically and detach from the model."""
        for site in self.sites:
            slim_site(site, torch.tensor(plan.keep_indices[site.name], dtype=torch.long), optimizer)
        self.detach_masks()
