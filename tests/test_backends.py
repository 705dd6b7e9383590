"""Backend selection, the environment override, and the `fastmerge info` command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastmerge
from fastmerge.backends import BackendUnavailableError, resolve_backend


def test_automatic_choice_on_cpu_is_the_cpu_extension():
    assert resolve_backend(None, torch.device("cpu")) == "cpu"


def test_environment_variable_overrides(monkeypatch):
    monkeypatch.setenv("FASTMERGE_BACKEND", "reference")
    assert resolve_backend(None, torch.device("cpu")) == "reference"
    assert resolve_backend("cpu", torch.device("cpu")) == "cpu"  # the argument wins


def test_requested_but_unusable_backend_says_why(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        fastmerge.scope_stats([torch.ones(3)], backend="cuda")
    monkeypatch.setenv("FASTMERGE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="FASTMERGE_BACKEND"):
        fastmerge.scope_stats([torch.ones(3)])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        fastmerge.scope_stats([torch.ones(3)], backend="triton")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastmerge.scope_stats([torch.ones(3)], backend="tpu")


def test_info_command_reports_the_build():
    out = subprocess.run(
        [sys.executable, "-m", "fastmerge.cli", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert f"fastmerge {fastmerge.__version__}" in out
    assert "fastmerge._C (cpu): built" in out
    assert "usable backends for cpu tensors: reference, cpu" in out
    assert "CPU threads:" in out


def test_set_num_threads_validates():
    with pytest.raises(ValueError):
        fastmerge.set_num_threads(0)
