"""Names registry.py imports; the code lives in family.py and ops.py."""

from .family import Family
from .ops import ModelConfigError

__all__ = ["Family", "ModelConfigError"]
