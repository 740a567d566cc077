"""End of the pruning phase: plan the final widths, fix the masks, slim the model physically."""

from __future__ import annotations

import torch

from lapp_edge.errors import UserError
from lapp_edge.lapp.controller import FreezeResult, LappController


def freeze(controller: LappController, optimizer: torch.optim.Optimizer | None = None,
           plan: FreezeResult | None = None) -> FreezeResult:
    """Round the learned widths to the channel multiple (`choose_widths`), check that the cost
    target is met within the controller's tolerance, zero the outgoing weights of channels that
    come back, and remove every pruned channel (optimizer state sliced alongside). The masks
    are detached afterwards: the model is a plain slim network. `plan`: apply this plan instead of
    planning here (several processes apply rank 0's, training/distributed.py).

    Raises UserError when no allowed width combination lands within the tolerance."""
    config = controller.config
    plan = plan if plan is not None else controller.plan_freeze()
    if abs(plan.cost_ratio - config.target) > config.tolerance:
        raise UserError(
            f"{controller.cost.name} target {config.target} was not reached: the closest network with widths that are "
            f"multiples of {config.channel_multiple} keeps {plan.cost_ratio:.4f} of the {controller.cost.name}"
        )
    controller.apply_final_masks(plan, optimizer)
    controller.slim(plan, optimizer)
    return plan
