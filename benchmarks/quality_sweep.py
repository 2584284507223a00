"""The main job's full protocol in parallel processes: choose each method's learning rate per budget
on a validation split, then run the seeds x budgets grid on the test set with those choices.

Phase A (selection): every candidate (method, lr, options) runs once per budget of
``--sweep-budgets`` (default: every budget) and seed of ``--val-seeds`` (default: 0), scored by its mean
accuracy on a validation split carved out of the training texts (``bench_quality.py --eval-split val``);
the test set is not looked at. Each
(method, budget) keeps its best candidate (ties: the smaller lr). With ``--extend-edges N``, a cell whose
best lr is the largest (smallest) of the grid gets one more lr above (below) it, up to N rounds. With
``--confirm-seeds``, the candidates within ``--confirm-margin`` of their cell's best also run on those
seeds, and the cell chooses among them by the mean over all their seeds. The
baselines are tuned the same way as the joint methods. ACIP's one run (trained to the smallest budget,
every budget materialised from it) takes ACIP's choice at the smallest budget, and also trains at the
larger ones (``bench_quality.one_run_options``); ``acip_per_budget`` takes ACIP's choice at each.
Phase B (evaluation): each (method, budget, seed) runs with its chosen candidate on the test set;
exactly those runs are merged into one results file and plot (``bench_quality.py --merge``).

Runs already made are not made again: every run line of the work folder and of ``--reuse`` files
with the same settings (method, budget, lr, options, seed, split, steps, batch, length) is taken
as it is, so an interrupted sweep resumes, and results of another device can be combined (say which
with ``--reuse``; only reuse runs of the current code of that method).

    python benchmarks/quality_sweep.py --device cuda --parallel 12 -- --model DIR --data DIR
    python benchmarks/quality_sweep.py --parallel 2 --lrs 1e-4 -- --steps 50      # a small CPU check

Arguments after ``--`` go to every ``bench_quality.py`` process (model, data, steps, ...). Each
phase has a deadline: a run still going then is stopped and reported as missing, the rest is kept.
Writes ``<out>.json`` / ``.png`` (the grid) and ``<out>_selection.json`` (every candidate's score).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402
from bench_quality import (  # noqa: E402
    ALIASES,
    DENSE_OTHER_LR,
    ONE_RUN_ALL_BUDGETS,
    one_run_options,
)

HERE = Path(__file__).resolve().parent
BENCH = HERE / "bench_quality.py"
METHODS = ["dense", "seq_svd", "seq_svd_llm", "acip", "acip_per_budget", "pc_lora", "tunecomp", "jactus", "lpaf"]
# Each method's first candidate (a method not listed: options {}). ACIP on whitened (SVD-LLM) factors, which the
# calibration batches make possible here (3 seeds, one run, lr 5e-4: 0.687 / 0.689 / 0.691 at 0.8 / 0.5 / 0.3,
# against 0.635 / 0.634 / 0.682 with the plain SVD of the paper; raw/quality_cpu_runs.jsonl and the acip_svd_basis
# rows of raw/quality_gpu_grid.jsonl), with the parameters outside the targeted layers at the dense lr
# (CompressionConfig.other_lr); PC-LoRA from SVD-LLM's truncation (not in the paper) with its dense branch gone
# after a quarter of the steps (decay_ratio 0.25; the paper's 0.5 is the library default); JACTUS after half the
# steps dense (warmup_frac) with its output error weighted half by the output-gradient covariance (grad_metric),
# neither in the method as specified; LPAF pruning by first-order scores (its library default; named so that runs
# record it). They were the bench's defaults until those became the choices at 0.5 (DEFAULT_METHOD_OPTIONS of
# bench_quality.py); the candidates stay as they were, so that their runs keep their keys.
BASE_OPTIONS = {"acip": {"basis": "svd_llm", "other_lr": DENSE_OTHER_LR},
                "pc_lora": {"init": "svd_llm", "decay_ratio": 0.25},
                "jactus": {"warmup_frac": 0.5, "grad_metric": 0.5},
                "lpaf": {"prune_score": "first_order"}}
# Method options tried besides BASE_OPTIONS (phase A picks among them on the validation split).
# PC-LoRA: the paper's LoRA init (the library's default, options {}) and SVD-LLM's whitened truncation with the
# paper's decay_ratio 0.5 beside the base candidate, that truncation with the dense branch gone after a quarter
# of the steps (decay_ratio 0.25). The truncation won at 0.8 and 0.5 on the CPU (validation, seed 0, lr 5e-4:
# 0.744 / 0.727 against 0.716 / 0.691); decay_ratio 0.25 gave 0.724 at 0.3 (lr 5e-4, seed 0) against 0.704,
# while 0.8 gave 0.689, and the LoRA init at 2e-3 0.693 / 0.707 against 0.709
# (raw/quality_cpu_val_pc_lora_decay.jsonl). LPAF's movement pruning is no longer tried (at chance for every lr
# on the H100 sweep). JACTUS: factoring at step 0 as the method is specified ({}) and, beside the base
# candidate's half the steps dense before it calibrates and factors (warmup_frac; validation, seed 0, lr 5e-4:
# 0.749 / 0.691 at 0.5 / 0.3 against 0.704 / 0.696 factoring at step 0), that warm-up with the bases trained
# after the factorisation. ACIP: without other_lr too (the parameters outside the targeted layers at the run's
# lr, as in the paper; the base candidate trains them at the dense lr 1e-4). PC-LoRA, JACTUS and LPAF with
# other_lr too (the parameters outside the targeted layers at the dense lr, while the method trains at 5e-4 or
# 2e-3), for each of their other options. A candidate whose other_lr is its lr is the same run as the one
# without other_lr and is made once (see run_key). PC-LoRA's allocation="global" is not tried: it lost on
# validation wherever it was tried (seed 0; see benchmarks/results/QUALITY.md). LPAF also with its
# sparsity-aware factorisation measured in the metric of the inputs (input_metric, not in the paper; without
# other_lr only).
EXTRA_OPTIONS: dict[str, list[dict]] = {
    "pc_lora": [{}, {"init": "svd_llm"}, {"init": "svd_llm", "other_lr": DENSE_OTHER_LR},
                {"other_lr": DENSE_OTHER_LR}],
    "jactus": [{}, {"warmup_frac": 0.5}, {"warmup_frac": 0.5, "train_bases": True},
               *({**o, "other_lr": DENSE_OTHER_LR} for o in ({}, {"warmup_frac": 0.5},
                                                         {"warmup_frac": 0.5, "train_bases": True})),
               # feature distillation, as TuneComp's below: validation 0.724 against 0.719 at 0.3
               {**BASE_OPTIONS["jactus"], "feature_weight": 1.0}],
    "acip": [{"basis": "svd_llm"},
             # feature distillation, as the others': probes (seed 0, lr 2e-3) 0.769 / 0.753 / 0.727 at 0.8 /
             # 0.5 / 0.3 against 0.762 / 0.740 / 0.736; chosen in every cell (0.769 / 0.752 / 0.736, seeds 0-2)
             {**BASE_OPTIONS["acip"], "feature_weight": 1.0}],
    # feature distillation to the pretrained layers (the bench turns off the logit KL): validation
    # 0.776 / 0.735 / 0.728 at 0.8 / 0.5 / 0.3 against 0.769 / 0.733 / 0.712 with none
    "tunecomp": [{"feature_weight": 1.0}],
    "lpaf": [{**BASE_OPTIONS["lpaf"], "other_lr": DENSE_OTHER_LR},
             {**BASE_OPTIONS["lpaf"], "input_metric": True},
             # feature distillation, as TuneComp's and JACTUS's: validation (seed 0, 0.8, lr 1e-4) 0.787 against 0.767
             {**BASE_OPTIONS["lpaf"], "input_metric": True, "feature_weight": 1.0}],
}


def run_pool(jobs: list[tuple[str, list[str]]], parallel: int, deadline: float, logdir: Path) -> dict[str, int | None]:
    """Run ``(name, argv)`` jobs, at most ``parallel`` at once, until ``deadline`` (time.monotonic).

    Returns ``{name: exit code}``; None for a job stopped at the deadline or never started.
    Each job's output goes to ``logdir/<name>.log``.
    """
    logdir.mkdir(parents=True, exist_ok=True)
    pending, running, codes = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel and time.monotonic() < deadline:
            name, argv = pending.pop(0)
            log = open(logdir / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed when the job ends)
            running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                codes[name] = proc.returncode
                log.close()
                del running[name]
                print(f"  {name}: exit {proc.returncode} ({len(codes)}/{len(jobs)} done)", flush=True)
        if time.monotonic() >= deadline:
            for name, (proc, log) in running.items():
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
                codes[name] = None
                print(f"  {name}: stopped at the deadline", flush=True)
            for name, _ in pending:
                codes[name] = None
            break
        time.sleep(0.5)
    return codes


def read_runs(paths) -> list[dict]:
    runs = []
    for path in paths:
        if Path(path).is_file():
            runs += [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return runs


def run_key(method: str, budget, lr: float, options: dict, seed: int, split: str, shape: dict) -> str:
    """What makes two runs the same run (``shape``: steps, batch_size, max_length).

    An ``other_lr`` equal to ``lr`` trains every parameter at ``lr``: the same run as without it.
    """
    if options.get("other_lr") == lr:
        options = {k: v for k, v in options.items() if k != "other_lr"}
    return json.dumps([method, None if budget is None else round(float(budget), 6), float(lr),
                       options, int(seed), split, shape["steps"], shape["batch_size"], shape["max_length"]],
                      sort_keys=True)


def record_key(r: dict) -> str:
    return run_key(r["method"], r["budget"], r["lr"], r.get("options") or {}, r["seed"], r["eval_split"],
                   {k: r[k] for k in ("steps", "batch_size", "max_length")})


def _bench_shape(passthrough: list[str]) -> dict:
    """steps / batch size / max length the bench processes will use (their defaults unless passed)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48)
    known, _ = p.parse_known_args(passthrough)
    return {"steps": known.steps, "batch_size": known.batch_size, "max_length": known.max_length}


def _method_lrs(values: list[str]) -> dict[str, list[float]]:
    out = {}
    for v in values:
        name, sep, lrs = v.partition("=")
        if not sep or not lrs:
            raise ValueError(f"expected METHOD=LR[,LR...], got {v!r}")
        out[name] = [float(x) for x in lrs.split(",")]
    return out


def near_best(candidates: list[dict], margin: float) -> list[dict]:
    """The scored candidates within ``margin`` of the best validation accuracy of their (method, budget)."""
    best: dict[tuple, float] = {}
    for c in candidates:
        if c["val_acc"] is not None:
            cell = (c["method"], c["budget"])
            best[cell] = max(best.get(cell, c["val_acc"]), c["val_acc"])
    return [c for c in candidates
            if c["val_acc"] is not None and c["val_acc"] >= best[(c["method"], c["budget"])] - margin]


def edge_candidates(candidates: list[dict]) -> list[tuple]:
    """One more lr beyond the grid's edge for every (method, options, budget) whose best lr is at an edge.

    The step is the ratio of the two nearest lrs of the grid (1e-4, 5e-4, 2e-3: x4 above, /5 below). A
    group with fewer than two finished candidates gets none.
    """
    groups: dict[tuple, list[dict]] = {}
    for c in candidates:
        groups.setdefault((c["method"], json.dumps(c["options"], sort_keys=True), c["budget"]), []).append(c)
    out = []
    for (m, _, b), group in groups.items():
        lrs = sorted({c["lr"] for c in group})
        scored = [c for c in group if c["val_acc"] is not None]
        if len(lrs) < 2 or len(scored) < 2:
            continue
        best = max(scored, key=lambda c: (c["val_acc"], -c["lr"]))
        if best["lr"] == lrs[-1]:
            out.append((m, b, lrs[-1] * lrs[-1] / lrs[-2], group[0]["options"]))
        elif best["lr"] == lrs[0]:
            out.append((m, b, lrs[0] * lrs[0] / lrs[1], group[0]["options"]))
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 2e-3], help="candidate learning rates")
    parser.add_argument("--method-lrs", nargs="+", default=[], metavar="METHOD=LR,LR",
                        help="a method's own candidate learning rates instead of --lrs")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5, 0.3])
    parser.add_argument("--sweep-budgets", type=float, nargs="+", default=None,
                        help="budgets of phase A (default: every budget; a budget left out takes the choice at "
                             "the nearest swept budget)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-seeds", type=int, nargs="+", default=[0],
                        help="seeds of every phase-A candidate; it is judged by their mean validation accuracy")
    parser.add_argument("--confirm-seeds", type=int, nargs="+", default=[],
                        help="more validation seeds for the candidates within --confirm-margin of their "
                             "(method, budget)'s best: that cell then chooses among them by the mean over all "
                             "their seeds (cuts the selection noise of few seeds at the cost of those runs only)")
    parser.add_argument("--confirm-margin", type=float, default=0.02, metavar="ACC",
                        help="validation accuracy below a cell's best within which a candidate is confirmed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="processes at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--phase-a-s", type=float, default=3600, help="deadline of phase A in seconds")
    parser.add_argument("--phase-b-s", type=float, default=4 * 3600, help="deadline of phase B in seconds")
    parser.add_argument("--extend-edges", type=int, default=0, metavar="N",
                        help="up to N rounds of one more lr beyond the grid wherever the best lr is at its edge")
    parser.add_argument("--selection-only", action="store_true", help="stop after phase A")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[], metavar="JSONL",
                        help="run lines (--runs-jsonl) of earlier runs to take instead of running them again")
    parser.add_argument("--workdir", type=Path, default=Path("quality_work"))
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/quality_<device>.json)")
    args = parser.parse_args(own)
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    if args.extend_edges < 0:
        parser.error("--extend-edges must be >= 0")
    if not args.confirm_margin >= 0:
        parser.error("--confirm-margin must be >= 0")
    if set(args.confirm_seeds) & set(args.val_seeds):
        parser.error("--confirm-seeds must not repeat a seed of --val-seeds")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {METHODS}")
    try:
        method_lrs = _method_lrs(args.method_lrs)
    except ValueError as err:
        parser.error(f"--method-lrs: {err}")
    missing = [str(p) for p in args.reuse if not p.is_file()]
    if missing:
        parser.error(f"--reuse: no such file {missing}")
    out = args.out or utils.RESULTS_DIR / f"quality_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json"
    base = [sys.executable, str(BENCH), "--device", args.device, "--threads", str(args.threads), *passthrough]
    shape = _bench_shape(passthrough)
    budgets = sorted(set(args.budgets), reverse=True)
    sweep_budgets = sorted(set(args.sweep_budgets or budgets), reverse=True)
    sweep_dir, grid_dir = args.workdir / "sweep", args.workdir / "grid"
    val_seeds = sorted(set(args.val_seeds))
    confirm_seeds = sorted(set(args.confirm_seeds))

    def known_runs() -> dict[str, dict]:
        """Every finished run: the --reuse files, then this work folder (the later line wins)."""
        files = [*args.reuse, *sorted(sweep_dir.glob("*.jsonl")), *sorted(grid_dir.glob("*.jsonl"))]
        runs = {}
        for r in read_runs(files):
            if r.get("status") == "ok":
                runs[record_key(r)] = r
        return runs

    # Phase A: candidates on the validation split, per budget
    candidates = []

    def add(m: str, b: float | None, lr: float, options: dict) -> None:
        candidates.append({"method": m, "budget": b, "lr": lr, "options": options,
                           "name": f"{m}_b{b}_lr{lr:g}_{len(candidates)}", "seeds": list(val_seeds),
                           "keys": [run_key(m, b, lr, options, seed, "val", shape) for seed in val_seeds]})

    def run_missing(stage: str, suffix: str, deadline: float) -> None:
        """Run every candidate's validation seeds that no run line holds yet (``suffix``: of the job names)."""
        done = known_runs()
        jobs, scheduled = [], set()
        for c in candidates:
            missing = [seed for seed, key in zip(c["seeds"], c["keys"], strict=True)
                       if key not in done and key not in scheduled]
            name = c["name"] + suffix
            if not missing or name in codes:
                continue
            scheduled.update(c["keys"])  # a candidate that is the same run (see run_key) waits for this one
            argv_c = [*base, "--methods", c["method"], "--seeds", *map(str, missing),
                      "--budgets", str(c["budget"] or 0.5),
                      "--eval-split", "val", "--method-lr", f"{c['method']}={c['lr']}",
                      "--method-options", f"{c['method']}={json.dumps(c['options'])}",
                      "--runs-jsonl", str(sweep_dir / f"{name}.jsonl"), "--out", str(sweep_dir / f"{name}.json")]
            jobs.append((name, argv_c))
        print(f"{stage}: {len(candidates)} candidates, {len(candidates) - len(jobs)} already run, {len(jobs)} to run, "
              f"{args.parallel} at a time", flush=True)
        codes.update(run_pool(jobs, args.parallel, deadline, sweep_dir / "logs"))
        done = known_runs()
        for c in candidates:
            runs = [done.get(key) for key in c["keys"]]
            c["val_accs"] = [r["acc"] if r else None for r in runs]
            # the mean over the candidate's validation seeds; None unless every seed finished
            c["val_acc"] = statistics.fmean(c["val_accs"]) if all(runs) else None
            c["exit"] = codes.get(c["name"], "reused" if all(runs) else None)  # reused: among the runs made before
            c["device"] = ", ".join(sorted({r.get("device_name") or r.get("device") for r in runs if r})) or None
            c["wall_s"] = sum(r["wall_s"] for r in runs if r) if any(runs) else None  # reused runs count too

    # an alias (acip_per_budget) is its base method: it takes the base method's choices
    for m in dict.fromkeys(ALIASES.get(m, m) for m in args.methods):
        for options in [BASE_OPTIONS.get(m, {}), *EXTRA_OPTIONS.get(m, [])]:
            for lr in method_lrs.get(m, args.lrs):
                for b in ([None] if m == "dense" else sweep_budgets):
                    add(m, b, lr, options)
    t0 = time.monotonic()
    codes: dict[str, int | None] = {}
    for round_ in range(args.extend_edges + 1):
        run_missing(f"phase A{f' (edge round {round_})' if round_ else ''}", "", t0 + args.phase_a_s)
        if round_ == args.extend_edges:
            break
        edges = edge_candidates(candidates)
        if not edges:
            break
        for m, b, lr, options in edges:
            add(m, b, lr, options)
    # cells whose near-best candidates also ran on --confirm-seeds (one of them at least on all of them)
    confirmed = set()
    if confirm_seeds:
        for c in near_best(candidates, args.confirm_margin):
            c["seeds"] += confirm_seeds
            c["keys"] += [run_key(c["method"], c["budget"], c["lr"], c["options"], seed, "val", shape)
                          for seed in confirm_seeds]
        run_missing("phase A (confirmation)", "_confirm", t0 + args.phase_a_s)
        confirmed = {(c["method"], c["budget"]) for c in candidates
                     if len(c["seeds"]) > len(val_seeds) and c["val_acc"] is not None}
    chosen: dict[tuple[str, float | None], dict] = {}
    for c in candidates:
        if (c["method"], c["budget"]) in confirmed and len(c["seeds"]) == len(val_seeds):
            continue  # a cell that was confirmed chooses among its confirmed candidates
        best = chosen.get((c["method"], c["budget"]))
        if c["val_acc"] is not None and (best is None or c["val_acc"] > best["val_acc"]
                                         or (c["val_acc"] == best["val_acc"] and c["lr"] < best["lr"])):
            chosen[(c["method"], c["budget"])] = c
    phase_a_s = time.monotonic() - t0
    fields = ("method", "budget", "lr", "options", "seeds", "val_acc", "val_accs", "exit", "device", "wall_s")
    selection = {"sweep_budgets": sweep_budgets, "lrs": args.lrs, "method_lrs": method_lrs, "phase_a_s": phase_a_s,
                 "extend_edges": args.extend_edges, "val_seeds": val_seeds,
                 "confirm_seeds": confirm_seeds, "confirm_margin": args.confirm_margin,
                 "reused_from": [str(p) for p in args.reuse],
                 "candidates": [{k: c[k] for k in fields} for c in candidates],
                 "chosen": [{k: c[k] for k in fields if k not in ("exit", "device", "wall_s")}
                            for c in chosen.values()],
                 # phase_a_s is this invocation's time (0 when every run was made before); runs_wall_s sums the
                 # runs' own wall times, wherever and whenever they ran
                 "runs_wall_s": sum(c["wall_s"] or 0.0 for c in candidates)}
    sel_path = out.with_name(out.stem + "_selection.json")
    utils.write_results(sel_path, selection["candidates"], kind="quality_selection", meta=selection)

    def choice(m: str, b: float | None) -> dict | None:
        """The chosen candidate of bench method ``m`` at budget ``b`` (nearest swept budget)."""
        base_m = ALIASES.get(m, m)
        if base_m == "dense":
            return chosen.get(("dense", None))
        if m in ONE_RUN_ALL_BUDGETS:
            b = min(budgets)  # one run trained to the smallest budget gives them all
        near = min(sweep_budgets, key=lambda s: (abs(s - b), -s))
        return chosen.get((base_m, near))

    plan = []  # (method, seed, candidate, budgets) of phase B
    for m in args.methods:
        groups: dict[str, tuple[dict, list]] = {}
        for b in ([None] if m == "dense" else budgets):
            c = choice(m, b)
            if c is None:
                print(f"  {m:16s} budget {b}: no finished candidate, left out of phase B", flush=True)
                continue
            print(f"  {m:16s} budget {b}: lr {c['lr']:g} {c['options'] or ''} (val acc {c['val_acc']:.3f})", flush=True)
            groups.setdefault(c["name"], (c, []))[1].append(b)
        for seed in args.seeds:
            for c, bs in groups.values():
                plan.append((m, seed, c, bs))
    if args.selection_only:
        return 0

    # Phase B: the grid on the test set
    def grid_options(m, c, bs):  # what the bench runs: a one-run method's options depend on its budgets
        return one_run_options(m, c["options"], bs)

    def grid_keys(m, seed, c, bs):
        return [run_key(m, b, c["lr"], grid_options(m, c, bs), seed, "test", shape) for b in bs]

    done = known_runs()
    jobs = []
    for m, seed, c, bs in sorted(plan, key=lambda p: p[0] == "dense"):  # the longer joint runs first
        if all(k in done for k in grid_keys(m, seed, c, bs)):
            continue
        name = f"{m}_s{seed}_lr{c['lr']:g}_{len(jobs)}"
        argv_g = [*base, "--methods", m, "--seeds", str(seed), "--budgets", *(str(b or 0.5) for b in bs),
                  "--method-lr", f"{m}={c['lr']}", "--method-options", f"{m}={json.dumps(grid_options(m, c, bs))}",
                  "--runs-jsonl", str(grid_dir / f"{name}.jsonl"), "--out", str(grid_dir / f"{name}.json")]
        jobs.append((name, argv_g))
    print(f"phase B: {len(plan)} runs planned, {len(plan) - len(jobs)} already run, {len(jobs)} to run, "
          f"{args.parallel} at a time", flush=True)
    t1 = time.monotonic()
    run_pool(jobs, args.parallel, t1 + args.phase_b_s, grid_dir / "logs")
    done = known_runs()
    chosen_runs = [done[k] for m, seed, c, bs in plan for k in grid_keys(m, seed, c, bs) if k in done]
    if not chosen_runs:
        print("phase B finished no run")
        return 1
    merged = args.workdir / "grid_chosen.jsonl"
    merged.write_text("".join(json.dumps(r) + "\n" for r in chosen_runs), encoding="utf-8")
    merge = [sys.executable, str(BENCH), "--merge", str(merged), "--out", str(out), *passthrough]
    print(f"phase B took {time.monotonic() - t1:.0f} s; merging {len(chosen_runs)} runs", flush=True)
    return subprocess.call(merge)


if __name__ == "__main__":
    sys.exit(main())
