"""``fastmerge extract-lora`` end to end on small checkpoints (a sharded base), the
adapter as a ``fastmerge merge`` input, and the bad-input cases (exit 2, one line,
nothing written)."""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch
import torch
import yaml

from fastmerge.cli import main
from fastmerge.lora import load_adapter


def _save(path, tensors, sharded=False, model_type="llama"):
    path.mkdir(parents=True)
    if sharded:
        files = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(tensors)}
        for f in set(files.values()):
            part = {n: t for n, t in tensors.items() if files[n] == f}
            safetensors.torch.save_file(part, path / f)
        index = {"metadata": {}, "weight_map": files}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        safetensors.torch.save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))


@pytest.fixture
def models(tmp_path):
    """base (sharded) and ft = base + a rank-2 change of each 2-D weight."""
    g = torch.Generator().manual_seed(0)
    shapes = {"m.fc.weight": (12, 10), "m.proj.weight": (10, 12), "m.norm.weight": (10,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    ft = {n: t.clone() for n, t in base.items()}
    for n in ("m.fc.weight", "m.proj.weight"):
        rows, cols = shapes[n]
        ft[n] += torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
    _save(tmp_path / "base", base, sharded=True)
    _save(tmp_path / "ft", ft)
    return tmp_path, base, ft


def test_extract_then_merge(models, capsys):
    root, base, ft = models
    out = root / "lora"
    code = main(
        [
            "extract-lora",
            "--base",
            str(root / "base"),
            "--model",
            str(root / "ft"),
            "--rank",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "m.fc" in text and "r=2" in text and "2 modules" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    adapter = load_adapter(out)
    for n in ("m.fc", "m.proj"):
        torch.testing.assert_close(
            adapter.delta(n), ft[f"{n}.weight"] - base[f"{n}.weight"], rtol=1e-4, atol=1e-4
        )
    cfg = root / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "dtype": "float32",
                "models": [{"model": f"{root / 'base'}+{out}", "parameters": {"weight": 1.0}}],
            }
        )
    )
    assert main(["merge", str(cfg), "--out", str(root / "merged"), "--quiet"]) == 0
    merged = {}
    for f in (root / "merged").glob("*.safetensors"):
        merged.update(safetensors.torch.load_file(f))
    for n in ("m.fc.weight", "m.proj.weight"):
        torch.testing.assert_close(merged[n], ft[n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged["m.norm.weight"], base["m.norm.weight"])


def test_energy_and_modules(models, capsys):
    root, _, _ = models
    out = root / "lora"
    code = main(
        [
            "extract-lora",
            "--base",
            str(root / "base"),
            "--model",
            str(root / "ft"),
            "--energy",
            "0.9999",
            "--modules",
            "fc$",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0 and capsys.readouterr().out == ""
    assert load_adapter(out).modules == ["m.fc"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--rank", "11"], r"module 'm\.fc': rank 11 is larger than its weight \[12, 10\]"),
        (["--rank", "0"], "rank must be an int >= 1"),
        (["--energy", "2"], r"energy must be a fraction in \(0, 1\]"),
        (["--modules", "("], "not a regular expression"),
        (["--device", "mps"], "--device: .mps. is not supported"),
    ],
)
def test_bad_input_exits_2_with_one_line(models, capsys, extra, match):
    root, _, _ = models
    out = root / "lora"
    code = main(
        [
            "extract-lora",
            "--base",
            str(root / "base"),
            "--model",
            str(root / "ft"),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fastmerge extract-lora: error: ") and err.count("\n") == 1
    assert re.search(match, err), err
    assert sorted(p.name for p in root.iterdir()) == ["base", "ft"]


def test_other_architecture_and_missing_model(models, capsys):
    root, base, _ = models
    _save(root / "gpt", base, model_type="gpt2")
    args = ["extract-lora", "--base", str(root / "base"), "--out", str(root / "o")]
    assert main([*args, "--model", str(root / "gpt")]) == 2
    assert "model_type 'gpt2' differs from the base model's 'llama'" in capsys.readouterr().err
    assert main([*args, "--model", str(root / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not (root / "o").exists()


def test_rank_and_energy_are_exclusive(models, capsys):
    root, _, _ = models
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "extract-lora",
                "--base",
                "b",
                "--model",
                "m",
                "--out",
                "o",
                "--rank",
                "2",
                "--energy",
                "0.9",
            ]
        )
    assert stop.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
