"""benchmarks/bench_quality.py: the per-seed comparison with the best sequential baseline, the one run's options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
bench_quality = pytest.importorskip("bench_quality")
make_tables = pytest.importorskip("make_tables")


def _cell(accs: dict[int, float], device: str = "cpu") -> dict:
    return {"status": "ok", "runs": [{"seed": s, "acc": a, "kept": 0.5, "wall_s": 1.0, "device": device}
                                     for s, a in accs.items()]}


def test_paired_difference_against_the_better_baseline_over_common_seeds():
    results = {
        ("dense", None): _cell({0: 0.80, 1: 0.82}),
        ("seq_svd", 0.5): _cell({0: 0.60, 1: 0.62, 2: 0.64}),
        ("seq_svd_llm", 0.5): _cell({0: 0.70, 1: 0.66, 2: 0.71}),  # the better mean: the one compared with
        ("jactus", 0.5): _cell({0: 0.72, 2: 0.70}),  # seed 1 missing: only seeds 0 and 2 are paired
        ("lpaf", 0.3): _cell({0: 0.5}),  # no baseline at 0.3
        ("pc_lora", 0.5): _cell({0: 0.9, 1: 0.9}, device="cuda"),  # same seeds, another device: no pair
    }
    rows = {(r["method"], r["budget"]): r for r in bench_quality.aggregate(results, [0, 1, 2], 10)}
    jactus = rows[("jactus", 0.5)]
    assert jactus["vs_seq_baseline"] == "seq_svd_llm"
    assert jactus["vs_seq_mean"] == pytest.approx(((0.72 - 0.70) + (0.70 - 0.71)) / 2)
    assert jactus["vs_seq_std"] == pytest.approx(0.03 / 2 ** 0.5)
    assert jactus["vs_seq_p"] == 1.0  # +0.02 and -0.01: each of the 4 sign patterns sums to |0.01| or more
    # the difference of the means would be 0.71 - 0.69 = +0.02: pairing is not that
    assert jactus["vs_seq_mean"] != pytest.approx(jactus["acc_mean"] - rows[("seq_svd_llm", 0.5)]["acc_mean"])
    for cell in [("dense", None), ("seq_svd", 0.5), ("seq_svd_llm", 0.5), ("lpaf", 0.3), ("pc_lora", 0.5)]:
        assert rows[cell]["vs_seq_mean"] is None and rows[cell]["vs_seq_baseline"] is None


def test_sign_flip_p_counts_the_sign_patterns_at_least_as_extreme_as_observed():
    p = bench_quality.sign_flip_p
    assert p([0.01, 0.02, 0.005, 0.03, 0.01]) == 2 / 32  # all one sign: only it and its mirror
    assert p([-0.01, -0.02, -0.005, -0.03, -0.01]) == 2 / 32  # two-sided
    # +-0.03 +-0.01 +-0.02: |sums| 0.06 0.04 0.02 0.00, each twice; observed 0.02 -> 6 of the 8 patterns
    assert p([0.03, 0.01, -0.02]) == 6 / 8
    assert p([0.1, -0.1]) == 1.0 and p([0.0, 0.0, 0.0]) == 1.0
    # flipping the small -0.001 makes the sum larger, flipping any other makes it smaller: 2 patterns, twice
    assert p([0.01, 0.02, 0.03, -0.001]) == 4 / 16
    # one large difference outweighs four small ones of the other sign whatever their signs: no evidence
    assert p([0.05, -0.001, -0.002, -0.003, -0.004]) == 1.0
    with pytest.raises(ValueError, match="1 to"):
        p([])


def test_table_cell_signs_the_difference_but_not_its_std():
    row = {"vs_seq_mean": -0.0123, "vs_seq_std": 0.004}
    assert make_tables._value(row, ("vs_seq_mean", "vs_seq_std"), "+.3f") == "-0.012 ± 0.004"
    assert make_tables._value({"vs_seq_mean": None}, ("vs_seq_mean", "vs_seq_std"), "+.3f") == "–"


def test_table_cell_lists_the_seeds_a_candidate_was_judged_on():
    assert make_tables._value({"seeds": [0, 1, 2]}, "seeds", "") == "0 1 2"
    assert make_tables._value({"seeds": []}, "seeds", "") == "–"
    assert make_tables._value({}, "seeds", "") == "–"  # a selection file written before confirmation existed


def test_acips_one_run_trains_at_every_budget_it_materialises_unless_told():
    options = bench_quality.one_run_options
    assert options("acip", {"basis": "svd_llm"}, [0.3, 0.8, 0.5]) == {
        "basis": "svd_llm", "curve_budgets": [0.8, 0.5], "other_lr": bench_quality.DENSE_OTHER_LR}
    assert options("acip", {"curve_budgets": [], "other_lr": 5e-4}, [0.8, 0.3]) == {  # set explicitly
        "curve_budgets": [], "other_lr": 5e-4}
    assert options("acip", {}, [0.5]) == {} and options("acip", {}, None) == {}
    assert options("acip_per_budget", {}, [0.8, 0.3]) == {}


def test_the_benchs_defaults_are_the_sweeps_choices_at_half_the_weights():
    """--quick (the README's main job, budget 0.5) runs every method with its lr and options chosen there."""
    selection = json.loads((BENCHMARKS / "results" / "quality_selection.json").read_text(encoding="utf-8"))
    chosen = {c["method"]: c for c in selection["meta"]["chosen"] if c["budget"] in (None, 0.5)}
    assert set(chosen) == set(bench_quality.DEFAULT_METHOD_LR)
    for method, c in chosen.items():
        assert (method, bench_quality.DEFAULT_METHOD_LR[method]) == (method, c["lr"])
        assert (method, bench_quality.DEFAULT_METHOD_OPTIONS.get(method, {})) == (method, c["options"])
