"""LAPP: learnable per-layer thresholds, a FLOPs-constrained loss, progressive pruning."""
