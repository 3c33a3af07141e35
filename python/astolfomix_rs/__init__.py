"""astolfomix_rs: merge dozens of Stable Diffusion checkpoints at the speed of the disk.

>>> import astolfomix_rs as am                                       # doctest: +SKIP
>>> am.mean(["a.safetensors", "b.safetensors"], "ab.safetensors")    # doctest: +SKIP
"""

from __future__ import annotations

from . import errors
from ._core import __version__, kernels
from .api import mean
from .core.engine import Report, execute
from .core.plan import Output, Plan, mean_plan
from .core.reader import Checkpoint, open_checkpoint
from .errors import AstolfomixError

__all__ = [
    "__version__",
    "AstolfomixError",
    "Checkpoint",
    "Output",
    "Plan",
    "Report",
    "errors",
    "execute",
    "kernels",
    "mean",
    "mean_plan",
    "open_checkpoint",
]
