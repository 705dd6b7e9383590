"""Every example in a public docstring runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch

import fastmerge

MODULES = [
    "fastmerge",
    "fastmerge._chunks",
    "fastmerge.stats",
    "fastmerge.ops.scope_stats",
    "fastmerge.ops._library",
    "fastmerge.ops.scope_grad",
    "fastmerge.ops.feature_center",
    "fastmerge.ops.feature_cost",
    "fastmerge.features",
    "fastmerge.least_squares",
    "fastmerge.dist",
    "fastmerge.ops.conv_gram",
    "fastmerge.ops.gram",
    "fastmerge.ops.lowrank_mixture",
    "fastmerge.ops.magnitude_threshold",
    "fastmerge.ops.magprune",
    "fastmerge.ops.nearswap",
    "fastmerge.ops.sce_combine",
    "fastmerge.ops.ties_combine",
    "fastmerge.ops.gta_combine",
    "fastmerge.merge",
    "fastmerge.merge._select",
    "fastmerge.merge.static",
    "fastmerge.merge.ties",
    "fastmerge.merge.generalized",
    "fastmerge.merge.regmean",
    "fastmerge.merge.fisher",
    "fastmerge.io",
    "fastmerge.io.safetensors",
    "fastmerge.io.checkpoint",
    "fastmerge.io.prefetch",
    "fastmerge.io.writer",
    "fastmerge.pleas",
    "fastmerge.pleas.groups",
    "fastmerge.pleas.spec",
    "fastmerge.pleas.op_rules",
    "fastmerge.pleas.permute",
    "fastmerge.pleas.matching",
    "fastmerge.pleas.allocation",
    "fastmerge.pleas.least_squares_stage",
    "fastmerge.pleas.merging",
    "fastmerge.pleas.multi_matching",
    "fastmerge.pleas.multi_layouts",
    "fastmerge.pleas.multi_least_squares",
    "fastmerge.pleas.multi",
    "fastmerge.pleas.weight_matching",
    "fastmerge.wsa.penalty",
    "fastmerge.wsa.scope",
    "fastmerge.wsa.regularizer",
    "fastmerge.wsa.connectivity",
    "fastmerge.wsa.fl",
    "fastmerge.cli.info",
    "fastmerge.engine",
    "fastmerge.engine.errors",
    "fastmerge.engine.registry",
    "fastmerge.engine.params",
    "fastmerge.engine.config",
    "fastmerge.engine.plan",
    "fastmerge.engine.output",
    "fastmerge.engine.run",
    "fastmerge.engine.distributed",
    "fastmerge.engine.hub",
    "fastmerge.engine.card",
    "fastmerge.engine.tokenizer",
    "fastmerge.engine.vocab_tensors",
    "fastmerge.engine.methods.sce",
    "fastmerge.engine.methods.twin",
    "fastmerge.engine.methods.pleas",
    "fastmerge.cli.bench",
    "fastmerge.bench",
    "fastmerge.bench._harness",
    "fastmerge.bench._suite",
    "fastmerge.bench._peers",
    "fastmerge.bench._machine",
    "fastmerge.bench._report",
    "fastmerge.bench._workloads",
    "fastmerge.bench.call_overhead",
    "fastmerge.bench.scope_stats",
    "fastmerge.bench.wsa",
    "fastmerge.bench.linear_assignment",
    "fastmerge.bench.feature_stats",
    "fastmerge.bench.least_squares",
    "fastmerge.bench.lowrank_mixture",
    "fastmerge.bench.ties",
    "fastmerge.bench.twin",
    "fastmerge.bench.regmean",
    "fastmerge.twin",
    "fastmerge.twin.svd",
    "fastmerge.twin.merger",
    "fastmerge.twin.io",
    "fastmerge.twin.router",
    "fastmerge.twin.model",
    "fastmerge.lora",
    "fastmerge.lora.adapter",
    "fastmerge.lora.extract",
    "fastmerge.cli.extract_lora",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    globs = {"torch": torch, "fastmerge": fastmerge, "np": np}
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, name, globs=dict(vars(module), **globs))
    assert tests, f"{name} has no docstring examples"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
