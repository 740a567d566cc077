"""Datasets: numpy readers (`readers`, no torch) and torch batching (`torch_data`).

`from lapp_edge.data import load_dataset` (the name before the restructure) still works: the
torch-side names are looked up in `torch_data` on first use, so importing this package alone
imports no torch (the deploy side reads through `readers`)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name in ("readers", "torch_data", "imagefolder", "image_files"):
        raise AttributeError(f"module 'lapp_edge.data' has no attribute {name!r}")
    import importlib

    torch_data = importlib.import_module("lapp_edge.data.torch_data")
    if name in torch_data.__all__:
        return getattr(torch_data, name)
    raise AttributeError(f"module 'lapp_edge.data' has no attribute {name!r}")
