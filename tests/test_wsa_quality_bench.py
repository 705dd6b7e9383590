"""Smoke test of the WSA quality study (bench/quality/wsa.py): its wiring, its selection on
the validation split and its measurements, not its figures. Needs scikit-learn (the
`quality` extra); skipped without it."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality" / "wsa.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("wsa_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    yield module
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(bench):
    full = bench.load_data()
    # A slice of every split keeps the test to seconds (the training slice keeps all classes).
    return {s: (x[:300], y[:300]) for s, (x, y) in full.items()}


def test_data_is_seeded_standardized_and_sized(bench):
    x = torch.rand(5, 1, 8, 8) * 16
    a, b = bench.augment(x, 3, seed=7), bench.augment(x, 3, seed=7)
    assert a.shape == (15, 1, bench.CANVAS, bench.CANVAS)
    assert torch.equal(a, b)
    assert not torch.equal(a, bench.augment(x, 3, seed=8))
    full = bench.load_data()
    xs, ys = full["train"]
    assert len(xs) == len(ys) == 2 * 1078  # 2 copies of the 60% training split
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-4
    assert (len(full["val"][1]), len(full["test"][1])) == (2 * 359, 2 * 360)
    assert set(ys.tolist()) == set(range(10))


def test_scope_gap_measures_mean_offset_and_std_ratio(bench):
    a = bench.build("mlp", 0)
    b = bench.build("mlp", 0)
    gap = bench.scope_gap(a, b)
    assert gap["std_ratio"] == pytest.approx([1.0] * 3)
    assert gap["abs_mean_diff"] == pytest.approx([0.0] * 3)
    with torch.no_grad():
        b.fc2.weight.mul_(2.0)  # doubles that layer's sigma and its mean
        b.fc3.weight.add_(0.5)  # shifts that layer's mean only
    gap = bench.scope_gap(a, b)
    assert gap["std_ratio"] == pytest.approx([1.0, 2.0, 1.0], rel=1e-5)
    assert gap["abs_mean_diff"][2] == pytest.approx(0.5, rel=1e-5)
    assert gap["abs_mean_diff"][1] == pytest.approx(
        abs(float(a.fc2.weight.detach().mean())), rel=1e-4
    )


def test_pairs_share_an_initialization_only_when_asked(bench, data):
    same, hypers, _ = bench.pair_setup("cnn", "hparams-same-init", 0, data)
    assert all(torch.equal(p, q) for p, q in zip(same[0].parameters(), same[1].parameters()))
    assert hypers == (bench.FREE, bench.DECAYED)
    diff, hypers, _ = bench.pair_setup("cnn", "seeds", 0, data)
    assert not torch.equal(diff[0].fc.weight, diff[1].fc.weight)
    assert hypers == (bench.DEFAULT, bench.DEFAULT)
    _, _, sets = bench.pair_setup("mlp", "data-same-init", 0, data)
    n = len(data["train"][1])
    assert len(sets[0][1]) + len(sets[1][1]) == n
    assert len(sets[0][1]) != len(sets[1][1])  # a non-IID split, not two halves


def test_fused_target_pulls_both_models_to_one_scope(bench, data):
    # With a strong WSA term toward the fused scope, the two models' sigma gap (which
    # different weight decays open) must close compared with plain training.
    plain = bench.train_pair("mlp", "hparams", bench.Method(), 0, data, epochs=3)
    wsa = bench.train_pair("mlp", "hparams", bench.Method(10.0, "fused"), 0, data, epochs=3)
    gap_plain = bench.scope_gap(*plain)["mean_std_ratio"]
    gap_wsa = bench.scope_gap(*wsa)["mean_std_ratio"]
    assert gap_wsa < gap_plain


def _record(val, test):
    path = {"val_mid_acc": val, "test_mid_acc": test}
    return {"raw": path, "aligned": path, "final_val_acc": val, "final_test_acc": test}


def test_selection_looks_at_validation_never_at_test(bench):
    cell = {
        "plain": [_record(50, 50)],
        "wsa-init-0.01": [_record(60, 40)],  # best on validation
        "wsa-init-1": [_record(40, 90)],  # best on test: must not be chosen
    }
    assert bench.select_connectivity(cell, "init") == "wsa-init-0.01"
    assert bench.select_fl(cell, "wsa-init-") == "wsa-init-0.01"


def test_fl_splits_never_leave_a_single_sample_batch(bench):
    labels = torch.arange(10).repeat(217)
    for alpha in (0.1, 0.5):
        parts = bench.fl_splits(labels, alpha, seed=0)
        assert len(parts) == bench.CLIENTS
        assert all(len(p) % bench.FL_BATCH != 1 for p in parts)
        joined = torch.cat(parts)
        assert joined.unique().numel() == joined.numel()  # no index twice


def test_quick_study_runs_end_to_end(bench, data, tmp_path):
    cfg = replace(bench.QUICK, rounds={"mlp": 1, "cnn": 1})
    conn = bench.run_connectivity(cfg, data, lambda s: None)
    fl = bench.run_fl(cfg, data, lambda s: None)
    for arch in cfg.archs:
        cell = conn[arch]["hparams"]
        assert set(cell) == {"plain", "wsa-init-0.1", "wsa-fused-0.1"}
        rec = cell["plain"][0]
        assert rec["raw"]["curve"]["alphas"][0] == 0.0 and len(rec["raw"]["curve"]["alphas"]) == 11
        for path in ("raw", "aligned"):
            assert rec[path]["test_loss_barrier"] >= 0
        assert set(fl[arch]["alpha=0.1, heterogeneous"]) == {
            "fedavg",
            "fedprox-0.01",
            "wsa-init-0.1",
            "wsa-fused-0.1",
        }
    rows = bench.connectivity_rows(conn, cfg.targets)
    assert "wsa-fused-0.1" in bench.connectivity_table(rows)
    assert "FedAvg + WSA (fused)" in bench.fl_table(fl, cfg.targets)
    gains = bench.default_scores(conn, fl)
    assert set(gains) == {"wsa-init-0.1", "wsa-fused-0.1"}
    bench.plot_connectivity(conn, cfg.targets, tmp_path / "c.png")
    bench.plot_fl(fl, cfg.targets, tmp_path / "f.png")
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "f.png").stat().st_size > 0
