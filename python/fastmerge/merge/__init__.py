"""Model merges: static merges over state dicts (averaging, task arithmetic, TIES and DARE)
and the data-aware merges of nn.Modules (RegMean, RegMean++ and Fisher merging).

The data-aware merges (:func:`regmean`, :func:`fisher_merge` with
:func:`fisher_information`) take models and batches of data, not state dicts, and are
library functions only (docs/data-aware.md). For the static merges, a state dict is any
mapping of name -> tensor, possibly lazy (each key is read once from every model; no model
is materialized whole). Every static merge takes `include` / `exclude` regexes
(``re.search`` on the key) choosing the keys to merge; the others, and non-floating tensors,
are copied from the base (for :func:`average`, the first model). Results keep the base's
dtypes; the arithmetic is float32 (float64 for float64 inputs).

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
from .fisher import fisher_information, fisher_merge
from .generalized import TensorMerge, generalized_task_arithmetic, keep_entries
from .regmean import RegMeanStatistics, regmean, regmean_from_statistics, regmean_statistics
from .static import average, dare, task_arithmetic, task_vectors
from .ties import keep_count, ties

__all__ = [
    "RegMeanStatistics",
    "StateDict",
    "TensorMerge",
    "average",
    "dare",
    "fisher_information",
    "fisher_merge",
    "generalized_task_arithmetic",
    "keep_count",
    "keep_entries",
    "key_selector",
    "regmean",
    "regmean_from_statistics",
    "regmean_statistics",
    "task_arithmetic",
    "task_vectors",
    "ties",
]
