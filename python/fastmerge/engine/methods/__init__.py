"""The registered merge methods, one file each; importing this package registers them.

Adding a method is one file here (a :class:`~fastmerge.engine.registry.MergeMethod`
passed to :func:`~fastmerge.engine.registry.register`) and one line below.
"""

from . import (  # noqa: F401  (each module registers its method)
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    pleas,
    ram,
    ramplus_tl,
    sce,
    slerp,
    task_arithmetic,
    ties,
    twin,
)
