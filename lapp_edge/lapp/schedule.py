"""The FLOPs target over the pruning phase: a cubic from 1.0 down to the final target
over the first `anneal_fraction` of the pruning steps, then held."""

from __future__ import annotations


def annealed_target(step: int, prune_steps: int, final_target: float, anneal_fraction: float = 0.75) -> float:
    anneal_steps = max(1.0, anneal_fraction * prune_steps)
    progress = min(1.0, step / anneal_steps)
    return final_target + (1.0 - final_target) * (1.0 - progress) ** 3
