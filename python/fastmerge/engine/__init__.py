"""The merge engine: a mergekit YAML -> a plan (one task per output tensor) -> a streamed run.

* :func:`run` merges a configuration into an output directory (what ``fastmerge merge``
  does); :func:`plan` only plans it (``--dry-run``).
* :func:`load_config` / :func:`parse_config` read and check a configuration
  (:mod:`fastmerge.engine.config`; parameter semantics in :mod:`fastmerge.engine.params`).
* The methods are :class:`MergeMethod` s in a registry (:func:`register`,
  :func:`get_method`, :func:`registered_methods`, :func:`method_table`), one file each in
  :mod:`fastmerge.engine.methods`.

Example:
    >>> import tempfile, torch, safetensors.torch
    >>> from fastmerge import engine
    >>> d = tempfile.mkdtemp()
    >>> for name, value in [("a", 1.0), ("b", 3.0)]:
    ...     safetensors.torch.save_file({"w": torch.full((2,), value)}, f"{d}/{name}.safetensors")
    >>> cfg = engine.parse_config({"merge_method": "linear",
    ...     "models": [f"{d}/a.safetensors", f"{d}/b.safetensors"]})
    >>> engine.run(cfg, f"{d}/out").tensors
    1
"""

from . import methods  # noqa: E402,F401,I001  (registers the built-in methods)
from .config import MergeConfig, load_config, parse_config
from .errors import CheckpointError, ConfigError
from .output import MergeSummary  # noqa: E402
from .plan import MergePlan, TensorTask  # noqa: E402
from .registry import (
    REQUIRED,
    MergeMethod,
    Parameter,
    get_method,
    method_table,
    register,
    registered_methods,
)
from .run import plan, run  # noqa: E402

__all__ = [
    "REQUIRED",
    "CheckpointError",
    "ConfigError",
    "MergeConfig",
    "MergeMethod",
    "MergePlan",
    "MergeSummary",
    "Parameter",
    "TensorTask",
    "get_method",
    "load_config",
    "method_table",
    "parse_config",
    "plan",
    "register",
    "registered_methods",
    "run",
]
