"""What a training step adds to plain SGD: nothing (dense), or the LAPP step.

The trainer's loop is the same for every phase; it calls the task at three points:

    task.before_forward()            LAPP: recompute every site's mask from scores and thresholds
    total = task.loss(loss, step)    LAPP: task loss + penalty_weight * |cost ratio - target(step)|
    ... backward, optimizer.step() ...
    task.after_step(step, state)     LAPP: (average the threshold gradients over processes,)
                                     Adam step on the thresholds, clamp, record kept widths

`task.zero_grad()` clears the task's own parameters (the thresholds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lapp_edge.lapp.controller import LappController
from lapp_edge.training.run_dir import RunState


class DenseTask:
    """Plain training: the hooks do nothing (dense baseline, and the slim phase)."""

    name = "dense"

    def before_forward(self) -> None:
        return None

    def loss(self, task_loss: torch.Tensor, step: int) -> torch.Tensor:
        return task_loss

    def zero_grad(self) -> None:
        return None

    def after_step(self, step: int, state: RunState) -> None:
        return None

    def cost_ratio(self) -> float | None:
        return None


class LappTask:
    """The LAPP pruning step around one optimizer step (thresholds trained by Adam).

    `prune_steps` is the pruning phase's length in steps (the target anneals over it);
    the threshold learning rate is max(config.threshold_lr, 8 / prune_steps): Adam moves a
    threshold by about lr per step, and short phases need larger steps to let thresholds
    cross the score range (~8 z units) within the phase (found on the prototype)."""

    name = "pruning"

    def __init__(self, controller: LappController, prune_steps: int, trace_every: int,
                 reduce_grads: Callable[[list[torch.Tensor]], None] | None = None) -> None:
        self.controller = controller
        self.prune_steps = prune_steps
        self.trace_every = trace_every
        # several processes (distributed.py): averages the thresholds' gradients before their step
        self.reduce_grads = reduce_grads
        threshold_lr = max(controller.config.threshold_lr, 8.0 / max(1, prune_steps))
        self.optimizer = torch.optim.Adam([controller.thresholds], lr=threshold_lr, weight_decay=0.0)

    def before_forward(self) -> None:
        self.controller.update_masks()

    def loss(self, task_loss: torch.Tensor, step: int) -> torch.Tensor:
        return task_loss + self.controller.penalty(self.controller.target_at(step, self.prune_steps))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def after_step(self, step: int, state: RunState) -> None:
        if self.reduce_grads is not None:
            self.reduce_grads([self.controller.thresholds])
        self.optimizer.step()
        self.controller.clamp_thresholds()
        if step % self.trace_every == 0:
            state.trace_steps.append(step)
            assert self.controller.kept is not None
            state.trace_widths.append([int(k) for k in self.controller.kept.detach().round().tolist()])

    def cost_ratio(self) -> float | None:
        return float(self.controller.cost_ratio().detach())

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "threshold_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.controller.load_state_dict(payload["controller"])
        self.optimizer.load_state_dict(payload["threshold_optimizer"])
