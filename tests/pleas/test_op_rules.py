"""The per-op rule tables of the permutation-group analysis: every operation that the module
documentation of ``fastmerge.pleas.op_rules`` lists has a rule, the import paths of the old
single-module ``groups`` still work, and a subclass of a supported module gets its rule."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmerge.pleas import op_rules, permutation_groups
from fastmerge.pleas.op_rules import FUNCTION_RULES, METHOD_RULES, MODULE_RULES

# (the name as the docstring writes it, the table, the key)
DOCUMENTED = [
    *[(n, MODULE_RULES, getattr(nn, n)) for n in ("Linear", "Embedding", "GroupNorm", "PReLU")],
    *[("Conv1d/2d/3d", MODULE_RULES, getattr(nn, f"Conv{k}d")) for k in (1, 2, 3)],
    *[("ConvTranspose*d", MODULE_RULES, getattr(nn, f"ConvTranspose{k}d")) for k in (1, 2, 3)],
    *[("BatchNorm*d", MODULE_RULES, getattr(nn, f"BatchNorm{k}d")) for k in (1, 2, 3)],
    *[("InstanceNorm*d", MODULE_RULES, getattr(nn, f"InstanceNorm{k}d")) for k in (1, 2, 3)],
    ("SyncBatchNorm", MODULE_RULES, nn.SyncBatchNorm),
    ("LayerNorm", MODULE_RULES, nn.LayerNorm),
    *([("RMSNorm", MODULE_RULES, nn.RMSNorm)] if hasattr(nn, "RMSNorm") else []),
    *[
        (n, MODULE_RULES, getattr(nn, n))
        for n in ("ReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "LeakyReLU", "ELU", "Hardswish")
    ],
    ("Softplus", MODULE_RULES, nn.Softplus),
    ("dropout", MODULE_RULES, nn.Dropout),
    ("identity", MODULE_RULES, nn.Identity),
    ("Softmax", MODULE_RULES, nn.Softmax),
    *[("pooling", MODULE_RULES, getattr(nn, n)) for n in ("MaxPool2d", "AvgPool2d", "LPPool2d")],
    ("adaptive", MODULE_RULES, nn.AdaptiveAvgPool2d),
    ("flatten", MODULE_RULES, nn.Flatten),
    ("unflatten", MODULE_RULES, nn.Unflatten),
    ("F.linear", FUNCTION_RULES, F.linear),
    *[("F.conv*d", FUNCTION_RULES, f) for f in (F.conv1d, F.conv2d, F.conv3d)],
    ("F.embedding", FUNCTION_RULES, F.embedding),
    ("F.batch_norm", FUNCTION_RULES, F.batch_norm),
    ("F.layer_norm", FUNCTION_RULES, F.layer_norm),
    ("F.group_norm", FUNCTION_RULES, F.group_norm),
    ("F.scaled_dot_product_attention", FUNCTION_RULES, F.scaled_dot_product_attention),
    *[("+ - * /", FUNCTION_RULES, f) for f in (operator.add, operator.sub, operator.mul)],
    ("+ - * /", FUNCTION_RULES, operator.truediv),
    *[("torch.add/mul/...", FUNCTION_RULES, f) for f in (torch.add, torch.mul)],
    ("where", FUNCTION_RULES, torch.where),
    *[("Softmax/log-softmax", FUNCTION_RULES, f) for f in (F.softmax, F.log_softmax)],
    *[("matmul", FUNCTION_RULES, f) for f in (torch.matmul, operator.matmul)],
    ("bmm", FUNCTION_RULES, torch.bmm),
    *[("Max/avg/adaptive", FUNCTION_RULES, f) for f in (F.max_pool2d, F.adaptive_avg_pool2d)],
    *[(f.__name__, FUNCTION_RULES, f) for f in (torch.flatten, torch.reshape, torch.squeeze)],
    ("unsqueeze", FUNCTION_RULES, torch.unsqueeze),
    *[(f.__name__, FUNCTION_RULES, f) for f in (torch.transpose, torch.permute, torch.cat)],
    *[(f.__name__, FUNCTION_RULES, f) for f in (torch.mean, torch.sum, torch.amax, torch.amin)],
    ("logsumexp", FUNCTION_RULES, torch.logsumexp),
    *[(f.__name__, FUNCTION_RULES, f) for f in (torch.stack, torch.chunk, torch.split)],
    ("basic indexing", FUNCTION_RULES, operator.getitem),
    (".T", FUNCTION_RULES, getattr),
    *[(m, METHOD_RULES, m) for m in ("view", "reshape", "flatten", "unflatten", "squeeze")],
    *[(m, METHOD_RULES, m) for m in ("unsqueeze", "transpose", "permute", "mean", "sum")],
    *[(m, METHOD_RULES, m) for m in ("amax", "amin", "logsumexp", "chunk", "split", "matmul")],
    ("bmm", METHOD_RULES, "bmm"),
    ("dtype/device casts", METHOD_RULES, "to"),
    ("dtype/device casts", METHOD_RULES, "float"),
    ("Softmax/log-softmax", METHOD_RULES, "softmax"),
]


@pytest.mark.parametrize("doc_name, table, key", DOCUMENTED, ids=lambda v: str(v)[:40])
def test_every_documented_op_has_a_rule(doc_name, table, key):
    assert doc_name in op_rules.__doc__
    assert key in table and callable(table[key])


def test_documented_opaque_module_has_no_rule():
    assert "nn.MultiheadAttention" in op_rules.__doc__
    assert nn.MultiheadAttention not in MODULE_RULES


def test_old_import_paths_still_work():
    from fastmerge.pleas import groups, permute, spec
    from fastmerge.pleas.groups import (  # noqa: F401  (names other modules import)
        PermutationSpec,
        _as_inputs,
        _named_tensors,
        apply_permutation,
        permutation_groups,
    )

    assert groups.PermutationSpec is spec.PermutationSpec
    assert groups.apply_permutation is permute.apply_permutation


class MyLinear(nn.Linear):
    pass


def test_subclass_of_a_supported_module_gets_its_rule():
    def net(layer):
        torch.manual_seed(0)
        return nn.Sequential(layer(4, 8), nn.ReLU(), layer(8, 2))

    x = torch.randn(3, 4)
    mine, plain = permutation_groups(net(MyLinear), x), permutation_groups(net(nn.Linear), x)
    assert mine.groups == plain.groups and mine.layers == plain.layers
    assert list(mine.groups) == ["0"]
