"""benchmarks/quality_sweep.py with a stand-in for bench_quality.py: per-budget selection, ACIP's one run,
reuse of runs already made, and the merge of exactly the chosen runs.

The stand-in writes one run line per (method, budget, seed) whose accuracy depends on the learning rate
as given by ``BEST`` (the lr that wins at each budget), and logs every call, so the test sees which runs
the sweep started.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
quality_sweep = pytest.importorskip("quality_sweep")

FAKE_BENCH = textwrap.dedent('''
    import argparse, json, sys
    from pathlib import Path

    BEST = {"seq_svd": {0.8: 1e-4, 0.3: 5e-4}, "acip": {0.8: 5e-4, 0.3: 1e-4}, "dense": {None: 5e-4}}
    p = argparse.ArgumentParser()
    for name in ("--methods", "--budgets", "--seeds", "--method-lr", "--method-options", "--merge"):
        p.add_argument(name, nargs="+")
    for name in ("--eval-split", "--runs-jsonl", "--out", "--device", "--threads", "--steps"):
        p.add_argument(name)
    a = p.parse_args()
    log = Path(__file__).with_name("calls.jsonl")
    if a.merge:
        runs = [json.loads(x) for f in a.merge for x in open(f) if x.strip()]
        Path(a.out).write_text(json.dumps({"rows": runs}))
        sys.exit(0)
    method, = a.methods
    lr = float(a.method_lr[0].split("=", 1)[1])
    options = json.loads(a.method_options[0].split("=", 1)[1])
    budgets = [float(b) for b in a.budgets]
    with open(log, "a") as f:
        f.write(json.dumps({"method": method, "budgets": budgets, "seeds": a.seeds, "split": a.eval_split or "test",
                            "lr": lr, "options": options}) + "\\n")
    base = "acip" if method == "acip_per_budget" else method
    for seed in map(int, a.seeds):
        for b in ([None] if method == "dense" else budgets):
            # the one ACIP run is trained to the smallest budget: its lr is judged there
            judged = min(budgets) if method == "acip" else b
            acc = 0.6 + (0.1 if BEST[base][judged] == lr else 0.0) + 0.001 * seed
            if base == "acip" and judged == 0.8 and abs(lr - 2.5e-3) < 1e-12:
                acc = 0.9  # beyond the grid's upper edge
            rec = {"method": method, "status": "ok", "seed": seed, "budget": b, "acc": acc, "kept": b or 1.0,
                   "wall_s": 1.0, "lr": lr, "options": options, "eval_split": a.eval_split or "test",
                   "steps": int(a.steps or 200), "batch_size": 16, "max_length": 48, "device": "cpu"}
            with open(a.runs_jsonl, "a") as f:
                f.write(json.dumps(rec) + "\\n")
''')


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE_BENCH)
    monkeypatch.setattr(quality_sweep, "BENCH", script)
    monkeypatch.setattr(quality_sweep, "EXTRA_OPTIONS", {})
    return tmp_path / "calls.jsonl"


def _calls(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def _sweep(tmp_path, *extra):
    return quality_sweep.main(["--methods", "dense", "seq_svd", "acip", "acip_per_budget", "--lrs", "1e-4", "5e-4",
                               "--budgets", "0.8", "0.3", "--seeds", "0", "1", "--parallel", "2",
                               "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "q.json"), *extra,
                               "--", "--steps", "7"])


def test_selection_per_budget_one_acip_run_and_exactly_the_chosen_runs_merged(tmp_path, fake_bench):
    assert _sweep(tmp_path) == 0
    calls = _calls(fake_bench)
    val = [c for c in calls if c["split"] == "val"]
    # dense once per lr; seq_svd and acip at each budget and lr; acip_per_budget takes acip's choices
    assert len(val) == 2 + 2 * 2 * 2
    assert not any(c["method"] == "acip_per_budget" for c in val)
    chosen = json.loads((tmp_path / "q_selection.json").read_text())["meta"]["chosen"]
    picks = {(c["method"], c["budget"]): c["lr"] for c in chosen}
    assert picks == {("dense", None): 5e-4, ("seq_svd", 0.8): 1e-4, ("seq_svd", 0.3): 5e-4,
                     ("acip", 0.8): 5e-4, ("acip", 0.3): 1e-4}
    test = [c for c in calls if c["split"] == "test"]
    acip_runs = [c for c in test if c["method"] == "acip"]
    assert len(acip_runs) == 2 and all(c["budgets"] == [0.8, 0.3] and c["lr"] == 1e-4 for c in acip_runs)
    # the one run also trains at the larger budget it materialises; selection and per-budget runs do not
    assert all(c["options"]["curve_budgets"] == [0.8] for c in acip_runs)
    assert not any("curve_budgets" in c["options"] for c in calls if c not in acip_runs)
    per_budget = sorted((c["budgets"][0], c["lr"]) for c in test if c["method"] == "acip_per_budget")
    assert per_budget == [(0.3, 1e-4), (0.3, 1e-4), (0.8, 5e-4), (0.8, 5e-4)]
    merged = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert all(r["eval_split"] == "test" and r["steps"] == 7 for r in merged)
    cells = {(r["method"], r["budget"]) for r in merged}
    assert cells == {("dense", None), ("seq_svd", 0.8), ("seq_svd", 0.3), ("acip", 0.8), ("acip", 0.3),
                     ("acip_per_budget", 0.8), ("acip_per_budget", 0.3)}
    assert len(merged) == 2 * len(cells)  # two seeds each, no other lr
    for r in merged:
        if r["method"] == "seq_svd":
            assert r["lr"] == picks[("seq_svd", r["budget"])]


def test_a_second_sweep_runs_nothing_and_reused_lines_are_not_run_again(tmp_path, fake_bench):
    assert _sweep(tmp_path) == 0
    n = len(_calls(fake_bench))
    assert _sweep(tmp_path) == 0
    assert len(_calls(fake_bench)) == n  # everything was in the work folder already

    # a fresh work folder, given the first one's runs as --reuse: still nothing to run
    lines = tmp_path / "earlier.jsonl"
    lines.write_text("".join(p.read_text() for p in sorted((tmp_path / "work").glob("*/*.jsonl"))))
    (tmp_path / "work").rename(tmp_path / "old_work")
    assert _sweep(tmp_path, "--reuse", str(lines)) == 0
    assert len(_calls(fake_bench)) == n
    # the selection still counts the wall time of the reused runs (one second each in the stand-in)
    meta = json.loads((tmp_path / "q_selection.json").read_text())["meta"]
    assert meta["runs_wall_s"] == pytest.approx(2 + 2 * 2 * 2)


def test_runs_with_other_settings_are_not_reused(tmp_path, fake_bench):
    assert _sweep(tmp_path) == 0
    n = len(_calls(fake_bench))
    assert quality_sweep.main(["--methods", "seq_svd", "--lrs", "1e-4", "--budgets", "0.8", "--seeds", "0",
                               "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "q2.json"),
                               "--", "--steps", "8"]) == 0  # other step count: not the same runs
    assert len(_calls(fake_bench)) == n + 2


def test_bad_arguments(tmp_path, fake_bench, capsys):
    with pytest.raises(SystemExit):
        quality_sweep.main(["--methods", "nope"])
    with pytest.raises(SystemExit):
        quality_sweep.main(["--method-lrs", "seq_svd"])
    with pytest.raises(SystemExit):
        quality_sweep.main(["--reuse", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert "unknown ['nope']" in err and "METHOD=LR" in err and "no such file" in err


def test_edge_extension_tries_one_more_lr_beyond_the_grid(tmp_path, fake_bench):
    assert _sweep(tmp_path, "--selection-only", "--extend-edges", "2") == 0
    meta = json.loads((tmp_path / "q_selection.json").read_text())["meta"]
    picks = {(c["method"], c["budget"]): c["lr"] for c in meta["chosen"]}
    assert picks[("acip", 0.8)] == pytest.approx(2.5e-3)  # found beyond the edge
    assert picks[("seq_svd", 0.3)] == 5e-4 and picks[("seq_svd", 0.8)] == 1e-4  # the extension lost
    tried = sorted((c["method"], c["budget"], round(c["lr"], 9)) for c in meta["candidates"])
    # every cell had its best at an edge: 5 cells x 2 lrs, then one lr beyond each (/5 below, x5 above)
    assert ("seq_svd", 0.8, 2e-5) in tried and ("seq_svd", 0.3, 2.5e-3) in tried and ("dense", None, 2.5e-3) in tried
    # round 2: only acip at 0.8 was best at its (new) edge
    assert ("acip", 0.8, 0.0125) in tried
    assert len(tried) == 10 + 5 + 1
    assert not [c for c in _calls(fake_bench) if c["split"] == "test"]  # --selection-only


def test_validation_seeds_are_averaged_and_only_missing_seeds_run(tmp_path, fake_bench):
    assert _sweep(tmp_path, "--selection-only") == 0
    n = len(_calls(fake_bench))
    assert _sweep(tmp_path, "--selection-only", "--val-seeds", "0", "1") == 0
    new = _calls(fake_bench)[n:]
    assert len(new) == 10 and all(c["seeds"] == ["1"] and c["split"] == "val" for c in new)  # seed 0 was there
    meta = json.loads((tmp_path / "q_selection.json").read_text())["meta"]
    assert meta["val_seeds"] == [0, 1]
    best = next(c for c in meta["candidates"] if c["method"] == "seq_svd" and c["budget"] == 0.8 and c["lr"] == 1e-4)
    assert best["val_accs"] == pytest.approx([0.7, 0.701]) and best["val_acc"] == pytest.approx(0.7005)


def test_a_candidate_whose_other_lr_is_its_lr_is_made_once(tmp_path, fake_bench, monkeypatch):
    # at lr 1e-4, other_lr 1e-4 trains every parameter at 1e-4: the run without other_lr
    monkeypatch.setattr(quality_sweep, "EXTRA_OPTIONS", {"seq_svd": [{"other_lr": 1e-4}]})
    assert quality_sweep.main(["--methods", "seq_svd", "--lrs", "1e-4", "5e-4", "--budgets", "0.8", "--seeds", "0",
                               "--selection-only", "--workdir", str(tmp_path / "work"),
                               "--out", str(tmp_path / "q.json"), "--", "--steps", "7"]) == 0
    val = sorted((c["lr"], json.dumps(c["options"])) for c in _calls(fake_bench))
    assert val == [(1e-4, "{}"), (5e-4, '{"other_lr": 0.0001}'), (5e-4, "{}")]
    # the candidate is still there (its lr grid stays whole), scored by the one run
    cands = json.loads((tmp_path / "q_selection.json").read_text())["meta"]["candidates"]
    at_1e4 = [c for c in cands if c["lr"] == 1e-4]
    assert len(cands) == 4 and len(at_1e4) == 2 and at_1e4[0]["val_acc"] == at_1e4[1]["val_acc"] is not None


def test_confirmation_seeds_rerun_the_near_best_and_can_overturn_the_choice(tmp_path, fake_bench, monkeypatch):
    # seq_svd at 0.8: lr 1e-4 wins seed 0 (0.7); lr 5e-4 is made a close second there (0.695) and the better
    # one on the confirmation seeds (0.75 against 0.701 / 0.702)
    script = fake_bench.with_name("fake_bench.py")
    line = "        acc = 0.6 + (0.1 if BEST[base][judged] == lr else 0.0) + 0.001 * seed\n"
    assert line in script.read_text()
    close_second = ("        if base == 'seq_svd' and b == 0.8 and lr == 5e-4:\n"
                    "            acc = 0.695 if seed == 0 else 0.75\n")
    script.write_text(script.read_text().replace(line, line + close_second))
    argv = ["--methods", "seq_svd", "--lrs", "1e-4", "5e-4", "2e-3", "--budgets", "0.8", "0.3", "--seeds", "0",
            "--selection-only", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "q.json")]
    confirm_args = ["--confirm-seeds", "1", "2", "--confirm-margin", "0.01"]
    assert quality_sweep.main([*argv, *confirm_args, "--", "--steps", "7"]) == 0
    confirm = [c for c in _calls(fake_bench) if c["seeds"] == ["1", "2"]]
    # only the two candidates within 0.01 of the best at 0.8 (0.7 and 0.695) and the best at 0.3 ran again
    assert sorted((c["budgets"][0], c["lr"]) for c in confirm) == [(0.3, 5e-4), (0.8, 1e-4), (0.8, 5e-4)]
    meta = json.loads((tmp_path / "q_selection.json").read_text())["meta"]
    picks = {c["budget"]: (c["lr"], c["val_accs"]) for c in meta["chosen"]}
    assert picks[0.8][0] == 5e-4 and picks[0.8][1] == pytest.approx([0.695, 0.75, 0.75])  # overturned
    assert picks[0.3][0] == 5e-4 and len(picks[0.3][1]) == 3
    assert meta["confirm_seeds"] == [1, 2]
    with pytest.raises(SystemExit):
        quality_sweep.main([*argv, "--confirm-seeds", "0"])  # a seed of --val-seeds
