"""Helpers over parameter pytrees that belong to neither model.

``param_count`` is the one parameter counter of the project (PhraseVAE, PhraseLDM, converted
checkpoints, benchmarks); it lives here so that users of either model import it without
importing the other model's module.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def param_count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays, numpy arrays or ``jax.ShapeDtypeStruct``s."""
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree))
