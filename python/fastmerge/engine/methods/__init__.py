"""The registered merge methods, one file each; importing this package registers them.

Adding a method is one file here (a :class:`~fastmerge.engine.registry.MergeMethod`
passed to :func:`~fastmerge.engine.registry.register`) and one line below.
"""

from . import (  # noqa: F401  (each module registers its method)
    dare_linear,
    dare_ties,
    linear,
    passthrough,
    pleas,
    task_arithmetic,
    ties,
    twin,
)
