"""fastmerge.dist: two gloo processes on loopback, each on half of the data, give what one
process gives on all of it (statistics within 1e-12, matchings and merges identical), and
exactly the ``.merge`` of the partial statistics.

The two-process runs are spawned once per module (scenario functions below, run in the
children) and their results are checked against single-process computations here.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

import fastmerge
from fastmerge import FeatureStats, LeastSquares, ScopeStats, pleas

pytestmark = pytest.mark.dist

WORLD = 2
SPAWN_TIMEOUT_S = 120


# ---- running functions on two ranks ------------------------------------------------------


def _rank_main(rank: int, world: int, rendezvous: str, out_dir: str, scenario) -> None:
    """Child process: join the gloo group, run `scenario(rank, world)`, save its result."""
    torch.set_num_threads(1)
    try:
        tdist.init_process_group(
            "gloo",
            init_method=f"file://{rendezvous}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            result = scenario(rank, world)
        finally:
            tdist.destroy_process_group()
    except BaseException:  # noqa: B036  (reported to the parent, which fails the test)
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(tmp_path, scenario, world: int = WORLD) -> list:
    """Run `scenario(rank, world)` in `world` gloo processes; their results, by rank."""
    rendezvous = str(tmp_path / "rendezvous")
    context = mp.start_processes(
        _rank_main,
        args=(world, rendezvous, str(tmp_path), scenario),
        nprocs=world,
        join=False,
        # fork: the children need not import torch again (seconds each on a busy machine);
        # torch and fastmerge's CPU thread pools are fork-safe.
        start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {world} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, result in enumerate(results):
        if isinstance(result, dict) and "error" in result:
            pytest.fail(f"rank {r} failed:\n{result['error']}")
    return results


# ---- data (the same on every rank; each rank takes its half) ------------------------------


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(1001, generator=g, dtype=torch.float64) * 0.02 + 3.0,
        torch.randn(37, generator=g, dtype=torch.float64),
        torch.randn(1, generator=g, dtype=torch.float64),  # rank 1's half is empty
    ]


def _half(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    bounds = [t.shape[0] * r // world for r in range(world + 1)]
    return t[bounds[rank] : bounds[rank + 1]]


def _feature_batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Paired activations with |mean| >> std (the shifts matter) and correlated units."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for n in (300, 211, 256, 170):
        base = torch.randn(n, 6, generator=g, dtype=torch.float64)
        xa = 40.0 + base @ torch.randn(6, 5, generator=g, dtype=torch.float64)
        xb = -7.0 + base @ torch.randn(6, 7, generator=g, dtype=torch.float64)
        batches.append((xa.to(dtype), xb.to(dtype)))
    return batches


def _rows(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    batches = []
    for n in (128, 97, 200, 64):
        x = torch.randn(n, 9, generator=g, dtype=torch.float64) + 1.5
        y = x @ torch.randn(9, 4, generator=g, dtype=torch.float64)
        y = y + 0.1 * torch.randn(n, 4, generator=g, dtype=torch.float64)
        batches.append((x.to(dtype), y.to(dtype)))
    return batches


def _my_batches(batches: list, rank: int, world: int) -> list:
    """Contiguous shares: rank 0 gets the first batches, as one process sees them first."""
    bounds = [len(batches) * r // world for r in range(world + 1)]
    return batches[bounds[rank] : bounds[rank + 1]]


def _features(batches, full: bool) -> FeatureStats:
    stats = FeatureStats(full=full)
    for xa, xb in batches:
        stats.update(xa, xb)
    return stats


def _least_squares(batches) -> LeastSquares:
    ls = LeastSquares(9, 4)
    for x, y in batches:
        ls.update(x, y)
    return ls


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
        nn.Linear(10, 3),
    ).double()  # fmt: skip


def _model_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(48, 5, generator=g, dtype=torch.float64) + 0.5 for _ in range(4)]


# ---- the scenario the two ranks run --------------------------------------------------------


def _statistics_scenario(rank: int, world: int) -> dict:
    out: dict = {}
    # ScopeStats: each rank holds a shard of every tensor.
    shards = [_half(t, rank, world) for t in _tensors()]
    out["scope"] = fastmerge.scope_stats(shards).all_reduce()
    # FeatureStats, both layouts, float64 (vs one process) and float32 (vs merge).
    for dtype in (torch.float64, torch.float32):
        mine = _my_batches(_feature_batches(dtype), rank, world)
        for full in (False, True):
            out[f"features-{dtype}-{full}"] = _features(mine, full).all_reduce().state_dict()
    # A rank without samples: the shifts come from the other rank.
    empty_first = _features(_feature_batches(torch.float64)[:2] if rank else [], True)
    out["features-empty-rank"] = fastmerge.dist.all_reduce_(empty_first).state_dict()
    for dtype in (torch.float64, torch.float32):
        ls = _least_squares(_my_batches(_rows(dtype), rank, world)).all_reduce()
        out[f"ls-{dtype}"] = (ls.count, ls.gram, ls.cross)
    # PLeaS on this rank's share of the batches; reductions happen automatically.
    data = _my_batches(_model_data(), rank, world)
    a, b = _mlp(0), _mlp(1)
    out["match"] = {name: m.perm_b for name, m in pleas.match(a, b, data).items()}
    bn = pleas.recompute_batchnorm(_mlp(0), data)[1]
    out["batchnorm"] = (bn.running_mean, bn.running_var, int(bn.num_batches_tracked))
    merged = pleas.merge(a, b, data, budget=1.5)
    out["merged"] = {k: v.clone() for k, v in merged.state_dict().items()}
    out["merged-fits"] = merged.fastmerge_info["least_squares"]
    # Opting out keeps the statistics rank-local.
    local = pleas.collect_features(a, b, data, pleas.permutation_groups(a, data[0]),
                                   distributed=False)  # fmt: skip
    out["local-count"] = local["0"].count
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("dist"), _statistics_scenario)


# ---- ScopeStats ---------------------------------------------------------------------------


def test_scope_stats_all_reduce_equals_one_process(ranks):
    whole = fastmerge.scope_stats(_tensors())
    for result in ranks:
        torch.testing.assert_close(result["scope"].mean, whole.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(result["scope"].std, whole.std, rtol=1e-12, atol=1e-15)
        assert torch.equal(result["scope"].count, whole.count)


def test_scope_stats_all_reduce_is_the_merge_of_the_shards(ranks):
    parts = [fastmerge.scope_stats([_half(t, r, WORLD) for t in _tensors()]) for r in range(2)]
    merged = parts[0].merge(parts[1])
    for result in ranks:
        for field in ("mean", "std", "count"):
            assert torch.equal(getattr(result["scope"], field), getattr(merged, field))


# ---- FeatureStats -------------------------------------------------------------------------


def _assert_states_close(got: dict, want: dict, rtol: float) -> None:
    assert got["count"] == want["count"]
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            scale = float(value.abs().max()) if value.numel() else 0.0
            torch.testing.assert_close(got[key], value, rtol=rtol, atol=rtol * scale, msg=key)


@pytest.mark.parametrize("full", [False, True])
def test_feature_stats_all_reduce_equals_one_process(ranks, full):
    whole = _features(_feature_batches(torch.float64), full)
    for result in ranks:
        got = FeatureStats.from_state_dict(result[f"features-{torch.float64}-{full}"])
        _assert_states_close(got.state_dict(), whole.state_dict(), rtol=1e-12)
        for kind in ("covariance", "correlation", "neg_sq_distance"):
            want = whole.cost(kind)
            scale = float(want.abs().max())
            torch.testing.assert_close(got.cost(kind), want, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("full", [False, True])
def test_feature_stats_all_reduce_is_the_merge_of_the_partials(ranks, dtype, full):
    batches = _feature_batches(dtype)
    parts = [_features(_my_batches(batches, r, WORLD), full) for r in range(WORLD)]
    merged = parts[0].merge(parts[1]).state_dict()
    for result in ranks:
        got = result[f"features-{dtype}-{full}"]
        assert got["count"] == merged["count"]
        for key, value in merged.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key


def test_feature_stats_rank_without_samples_takes_the_other_ranks_shifts(ranks):
    want = _features(_feature_batches(torch.float64)[:2], True).state_dict()
    for result in ranks:
        got = result["features-empty-rank"]
        assert got["count"] == want["count"]
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key


# ---- LeastSquares -------------------------------------------------------------------------


def test_least_squares_all_reduce_equals_one_process(ranks):
    whole = _least_squares(_rows(torch.float64))
    for result in ranks:
        count, gram, cross = result[f"ls-{torch.float64}"]
        assert count == whole.count
        for got, want in ((gram, whole.gram), (cross, whole.cross)):
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * scale)


def test_least_squares_all_reduce_flushes_float32_partials_like_merge(ranks):
    batches = _rows(torch.float32)
    parts = [_least_squares(_my_batches(batches, r, WORLD)) for r in range(WORLD)]
    merged = parts[0].merge(parts[1])
    for result in ranks:
        count, gram, cross = result[f"ls-{torch.float32}"]
        assert count == merged.count
        assert torch.equal(gram, merged.gram) and torch.equal(cross, merged.cross)


# ---- PLeaS --------------------------------------------------------------------------------


def test_match_on_two_ranks_gives_the_one_process_permutations(ranks):
    want = pleas.match(_mlp(0), _mlp(1), _model_data())
    for result in ranks:
        assert result["match"].keys() == want.keys()
        for name, m in want.items():
            assert torch.equal(result["match"][name], m.perm_b), name


def test_recompute_batchnorm_averages_over_every_ranks_batches(ranks):
    bn = pleas.recompute_batchnorm(_mlp(0), _model_data())[1]
    for result in ranks:
        mean, var, batches = result["batchnorm"]
        torch.testing.assert_close(mean, bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(var, bn.running_var, rtol=1e-12, atol=1e-14)
        assert batches == int(bn.num_batches_tracked) == 4


def test_pleas_merge_on_two_ranks_matches_one_process_and_ranks_agree(ranks):
    merged = pleas.merge(_mlp(0), _mlp(1), _model_data(), budget=1.5)
    want = merged.state_dict()
    first = ranks[0]["merged"]
    for result in ranks:
        assert result["merged"].keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(result["merged"][key], first[key]), key  # ranks agree exactly
            if value.dtype.is_floating_point:
                scale = float(value.abs().max()) if value.numel() else 0.0
                torch.testing.assert_close(
                    result["merged"][key], value, rtol=1e-9, atol=1e-9 * scale, msg=key
                )
            else:
                assert torch.equal(result["merged"][key], value), key
        for name, fit in merged.fastmerge_info["least_squares"].items():
            assert result["merged-fits"][name].samples == fit.samples


def test_distributed_false_keeps_statistics_rank_local(ranks):
    assert [result["local-count"] for result in ranks] == [96, 96]


# ---- errors: raised on every rank, never a hang -------------------------------------------


def _mismatch_scenario(rank: int, world: int) -> dict:
    out = {}
    attempts = {
        "features": lambda: FeatureStats().update(torch.ones(2, 3 + rank), torch.ones(2, 2)),
        "least_squares": lambda: LeastSquares(3, 1 + rank),
        "scope": lambda: ScopeStats.from_values([0.0] * (1 + rank), [1.0]),
        "kinds": lambda: LeastSquares(3, 1) if rank else FeatureStats(),
    }
    for name, make in attempts.items():
        try:
            fastmerge.dist.all_reduce_(make())
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    try:
        fastmerge.dist.all_reduce_(torch.ones(3))
    except TypeError as e:
        out["type"] = str(e)
    return out


def test_mismatched_accumulators_raise_on_every_rank(tmp_path):
    results = run_ranks(tmp_path, _mismatch_scenario)
    for result in results:
        assert "(d_a, d_b)" in result["features"] and "rank 1: (4, 2)" in result["features"]
        assert "(d_in, d_out, bias)" in result["least_squares"]
        assert "different numbers of entries" in result["scope"]
        assert "different kinds" in result["kinds"]
        assert "FeatureStats or LeastSquares, got Tensor" in result["type"]


# ---- without a process group --------------------------------------------------------------


def test_without_a_process_group_nothing_is_reduced_and_explicit_requests_fail():
    assert not fastmerge.dist.is_distributed()
    assert fastmerge.dist.should_reduce(None) is False
    assert fastmerge.dist.rank_and_world_size() == (0, 1)
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        fastmerge.dist.should_reduce(True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        FeatureStats().update(torch.ones(2, 1), torch.ones(2, 1)).all_reduce()
    with pytest.raises(TypeError, match="distributed must be None, True or False"):
        fastmerge.dist.should_reduce("yes")
    model = _mlp(0)
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        pleas.recompute_batchnorm(model, _model_data(), distributed=True)


# ---- fastmerge merge on two ranks ---------------------------------------------------------


def _write_models(root) -> str:
    """Three small safetensors models and a TIES config; returns the config's path."""
    import safetensors.torch

    g = torch.Generator().manual_seed(4)
    shapes = {"embed.weight": (33, 8), "layer.0.weight": (8, 8), "layer.0.bias": (8,),
              "layer.1.weight": (16, 8), "head.weight": (5, 16), "scale": ()}  # fmt: skip
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for name in ("base", "a", "b"):
        delta = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
        tensors = base if name == "base" else {k: base[k] + delta[k] for k in shapes}
        safetensors.torch.save_file(tensors, str(root / f"{name}.safetensors"))
    config = root / "ties.yaml"
    config.write_text(
        "merge_method: ties\n"
        f"base_model: {root / 'base.safetensors'}\n"
        "models:\n"
        f"  - model: {root / 'a.safetensors'}\n"
        "    parameters: {weight: 0.6, density: 0.5}\n"
        f"  - model: {root / 'b.safetensors'}\n"
        "    parameters: {weight: 0.4, density: 0.7}\n"
    )
    return str(config)


def _read_output(out) -> dict[str, torch.Tensor]:
    from fastmerge.io import open_checkpoint

    return dict(open_checkpoint(out).items())


def _cli_scenario(config: str, out: str, fail: str = ""):
    """Each rank runs the CLI (the process group exists: it is used as it is)."""

    def scenario(rank: int, world: int) -> dict:
        from unittest import mock

        from fastmerge.cli import main
        from fastmerge.io import ShardedWriter

        patches = []
        if fail == "rank 1 while writing" and rank == 1:
            patches.append(
                mock.patch.object(ShardedWriter, "write", side_effect=OSError("disk full"))
            )
        if fail == "rank 0 while publishing" and rank == 0:
            from fastmerge.io.publish import Staging

            patches.append(mock.patch.object(Staging, "publish",
                                             side_effect=OSError("rename failed")))  # fmt: skip
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            stack.enter_context(contextlib.redirect_stderr(err))
            code = main(["merge", config, "--out", out, "--quiet", "--shard-size", "600"])
        return {"code": code, "stderr": err.getvalue()}

    return scenario


def test_cli_merge_on_two_ranks_is_bit_identical_to_one_process(tmp_path):
    config = _write_models(tmp_path)
    from fastmerge.cli import main

    assert main(["merge", config, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    results = run_ranks(tmp_path, _cli_scenario(config, str(tmp_path / "two")))
    assert [r["code"] for r in results] == [0, 0], [r["stderr"] for r in results]
    one, two = _read_output(tmp_path / "one"), _read_output(tmp_path / "two")
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert two[name].dtype == value.dtype and torch.equal(two[name], value), name
    index = (tmp_path / "two" / "model.safetensors.index.json").read_text()
    shards = {f.name for f in (tmp_path / "two").glob("*.safetensors")}
    assert len(shards) > 1 and all(s in index for s in shards)  # both ranks' shards indexed
    assert not list(tmp_path.glob(".two*"))  # no temporary directory left


@pytest.mark.parametrize("fail", ["rank 1 while writing", "rank 0 while publishing"])
def test_cli_merge_failure_on_one_rank_leaves_nothing(tmp_path, fail):
    config = _write_models(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    results = run_ranks(tmp_path, _cli_scenario(config, str(tmp_path / "out"), fail))
    assert [r["code"] for r in results] == [2, 2]
    failing = 1 if fail.startswith("rank 1") else 0
    assert ("disk full" if failing else "rename failed") in results[failing]["stderr"]
    assert "rank" in results[1 - failing]["stderr"] and "failed" in results[1 - failing]["stderr"]
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("rank", "rendez")))
    assert left == before  # no output, no temporary directory


def test_cli_merge_under_torchrun(tmp_path):
    """The real launch: torchrun starts two ranks that join the group from the environment."""
    import subprocess
    import sys

    config = _write_models(tmp_path)
    from fastmerge.cli import main

    assert main(["merge", config, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "fastmerge.cli", "merge", config,
               "--out", str(tmp_path / "two"), "--shard-size", "600"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("merged 6 tensors") == 1  # rank 0 prints the whole merge's summary
    one, two = _read_output(tmp_path / "one"), _read_output(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(two[name], value) for name, value in one.items())


def _stalled_rank(rank: int, world: int):
    """Rank 1 stops answering (as under SIGSTOP); rank 0 votes with a 2 s timeout."""
    from fastmerge.engine.distributed import OtherRankFailed, _Agreement

    if rank == 1:
        time.sleep(6)
        return "stalled"
    start = time.monotonic()
    try:
        _Agreement(timeout_s=2.0).barrier()
    except OtherRankFailed as exc:
        return str(exc), time.monotonic() - start
    return "no error", time.monotonic() - start


def test_a_rank_that_stops_answering_is_named_within_the_timeout(tmp_path):
    (message, waited), stalled = run_ranks(tmp_path, _stalled_rank)
    assert stalled == "stalled"
    assert "rank 0 of 2: rank(s) 1 did not answer within --timeout 2 s" in message, message
    assert waited < 5


def test_cli_timeout_must_be_positive(tmp_path, capsys):
    from fastmerge.cli import main

    for bad in ("0", "-1", "inf", "nan", "soon"):
        assert main(["merge", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "o"),
                     "--timeout", bad]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "--timeout must be a positive number of seconds" in err and err.count("\n") == 1
