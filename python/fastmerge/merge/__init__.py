"""Static model merges over state dicts: averaging, task arithmetic, TIES and DARE.

A state dict is any mapping of name -> tensor, possibly lazy (each key is read once
from every model; no model is materialized whole). Every merge takes `include` /
`exclude` regexes (``re.search`` on the key) choosing the keys to merge; the others, and
non-floating tensors, are copied from the base (for :func:`average`, the first model).
Results keep the base's dtypes; the arithmetic is float32 (float64 for float64 inputs).

Example:
    >>> import torch
    >>> from fastmerge import merge
    >>> base = {"w": torch.zeros(2)}
    >>> experts = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 2.0])}]
    >>> merge.task_arithmetic(base, experts)["w"].tolist()
    [4.0, 0.0]
    >>> merge.ties(base, experts, density=1.0)["w"].tolist()
    [2.0, 0.0]
"""

from ._select import StateDict, key_selector
from .generalized import TensorMerge, generalized_task_arithmetic, keep_entries
from .static import average, dare, task_arithmetic, task_vectors
from .ties import keep_count, ties

__all__ = [
    "StateDict",
    "TensorMerge",
    "average",
    "dare",
    "generalized_task_arithmetic",
    "keep_count",
    "keep_entries",
    "key_selector",
    "task_arithmetic",
    "task_vectors",
    "ties",
]
