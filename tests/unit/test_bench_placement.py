"""bench/placement.py and its EPLB baseline: a tiny smoke run (so the script cannot rot) and the
baseline's pieces checked against the published algorithm's rules and `PlacementPlan`."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moeray.actors.placement import PlacementPlan

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eplb():
    return load("eplb_baseline")


def test_quick_bench_runs(capsys):
    results = load("placement").main(["--quick", "--rounds", "3", "--warmup", "1"])
    assert set(results) == {"zipf", "lognormal", "drift"}
    for summary in results.values():
        assert summary["colocated"] == 0
        assert np.isfinite([summary["gap_steady"], summary["gap_all"], summary["ratio_all"]]).all()
        assert 0 <= summary["ratio_all"] <= 1
    assert "| moeray |" in capsys.readouterr().out


def test_replicate_gives_copies_to_the_highest_load_per_copy(eplb):
    replicas = eplb.replicate(np.array([[8.0, 4.0, 1.0, 1.0]]), 7)
    # 8 -> 2 copies (4 each), then 4 vs 4: the first wins -> 3 copies of 8 (2.67), then 4 -> 2 copies
    assert replicas.tolist() == [[3, 2, 1, 1]]
    with pytest.raises(ValueError):
        eplb.replicate(np.ones((1, 4)), 3)


def test_pack_heaviest_copy_to_the_lightest_group_with_room(eplb):
    load = np.array([[8.0, 4.0, 1.0, 1.0]])
    p2l = eplb.pack(load, eplb.replicate(load, 6), num_groups=2, slots_per_group=3)
    # copies 4 (e1), 8/3 x3 (e0), 1 (e2), 1 (e3): 4 -> g0, 8/3 -> g1, 8/3 -> g1, 8/3 -> g0, 1 -> g1
    # (6.33 < 6.67), and g1 is full: 1 -> g0
    assert p2l.tolist() == [[[1, 0, 3], [0, 0, 2]]]  # two copies of expert 0 share group 1
    assert eplb.colocated(p2l) == 1
    assert eplb.imbalance(p2l, load).tolist() == pytest.approx([(4 + 8 / 3 + 1) / 7])


def test_pack_may_co_locate_copies(eplb):
    # one hot expert, three copies, two groups of two slots: two copies must share a group
    load = np.array([[9.0, 0.1]])
    p2l = eplb.rebalance(load, num_groups=2, slots_per_group=2)
    assert eplb.colocated(p2l) == 1


def test_imbalance_matches_placement_plan(eplb):
    rng = np.random.default_rng(0)
    plan = PlacementPlan.default(3, 16, 4, redundant_slots=2)
    load = rng.random((3, 16)) * 100
    expected = plan.imbalance(torch.tensor(load)).numpy()
    assert eplb.imbalance(plan.physical_to_logical.numpy(), load) == pytest.approx(expected)


def test_align_relabels_groups_without_changing_balance(eplb):
    rng = np.random.default_rng(1)
    previous = PlacementPlan.default(2, 16, 4, redundant_slots=1).physical_to_logical.numpy()
    shuffled = previous[:, [2, 0, 3, 1]]  # the same packs, other group labels
    assert eplb.loads_between(previous, shuffled) > 0
    aligned = eplb.align(shuffled, previous)
    assert eplb.loads_between(previous, aligned) == 0
    load = rng.random((2, 16))
    assert eplb.imbalance(aligned, load) == pytest.approx(eplb.imbalance(shuffled, load))


def test_greedy_match_is_a_permutation(eplb):
    overlap = np.array([[3, 1, 0], [3, 2, 0], [0, 0, 1]])
    rows, cols = eplb._greedy_match(overlap)
    assert rows.tolist() == [0, 1, 2] and sorted(cols.tolist()) == [0, 1, 2]
    assert cols.tolist() == [0, 1, 2]
