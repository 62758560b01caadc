"""Pure-PyTorch reference side of nvfp4_jax: NVFP4 numerics, array conversions, calibration.

Submodules are imported lazily so that ``import torch_bridge`` does not pull in transformers.
"""

from __future__ import annotations

import importlib

__all__ = ["reference", "arrays", "calibration"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
