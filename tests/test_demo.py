"""``python -m fastmerge.demo --quick``: every step of the tour runs and says what it did;
the data falls back to generated clusters without scikit-learn."""

from __future__ import annotations

import re
import sys

from fastmerge import demo


def test_quick_tour_prints_every_step(capsys):
    demo.main(["--quick"])
    out = capsys.readouterr().out
    for step in range(1, 6):
        assert f"[{step}/5]" in out, step
    assert "fastmerge._C (cpu):" in out
    assert re.search(r"WSA penalty over 31 training steps of A: [\d.]+ -> [\d.]+", out)
    assert re.search(r"PLeaS at 1\.0x FLOPs \(realized 1\.00x\): [\d.]+%", out)
    assert re.search(r"PLeaS at 1\.5x FLOPs \(realized 1\.[45]\dx\): [\d.]+%", out)
    assert re.search(r"router picks the right task for [\d.]+% .* routed Twin model", out)
    assert re.search(r"6 tensors, read \d+ kB", out) and "merged model:" in out
    assert "tour done in" in out
    # The router separates the two tasks far better than chance (a broken router is ~50%).
    router = float(re.search(r"right task for ([\d.]+)%", out).group(1))
    assert router > 75.0, out


def test_data_without_scikit_learn_is_generated(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    (x, y, tx, ty), name = demo.load_data()
    assert name.startswith("generated clusters")
    assert x.shape == (1350, 64) and tx.shape == (450, 64)
    assert set(y.tolist()) == set(range(10))
