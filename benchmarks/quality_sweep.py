"""The main job's full protocol in parallel processes: choose each method's learning rate on a
validation split, then run the seeds x budgets grid on the test set with those choices.

Phase A (selection): every candidate (method, lr, options) runs once, seed 0, budget
``--sweep-budget``, scored on a validation split carved out of the training texts
(``bench_quality.py --eval-split val``); the test set is not looked at. Each method keeps its
best candidate (ties: the smaller lr). The baselines are tuned the same way as the joint methods.
Phase B (evaluation): each (method, seed) runs every budget with its chosen candidate on the
test set; the runs are merged into one results file and plot (``bench_quality.py --merge``).

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
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402
from bench_quality import ALIASES  # noqa: E402  (bench-only names, e.g. acip_per_budget -> acip)

HERE = Path(__file__).resolve().parent
BENCH = HERE / "bench_quality.py"
METHODS = ["dense", "seq_svd", "seq_svd_llm", "acip", "acip_per_budget", "pc_lora", "tunecomp", "jactus", "lpaf"]
# Method options tried besides the defaults (phase A picks among them on the validation split).
EXTRA_OPTIONS = {"lpaf": [{"prune_score": "movement"}]}


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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--sweep-budget", type=float, default=0.5)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="processes at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--phase-a-s", type=float, default=3600, help="deadline of phase A in seconds")
    parser.add_argument("--phase-b-s", type=float, default=4 * 3600, help="deadline of phase B in seconds")
    parser.add_argument("--workdir", type=Path, default=Path("quality_work"))
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/quality_<device>.json)")
    args = parser.parse_args(own)
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {METHODS}")
    out = args.out or utils.RESULTS_DIR / f"quality_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json"
    base = [sys.executable, str(BENCH), "--device", args.device, "--threads", str(args.threads), *passthrough]

    # Phase A: candidates on the validation split
    sweep_dir = args.workdir / "sweep"
    candidates = []
    # an alias (acip_per_budget) is the same method at the sweep budget: it takes its base method's choice
    for m in dict.fromkeys(ALIASES.get(m, m) for m in args.methods):
        for options in [{}, *EXTRA_OPTIONS.get(m, [])]:
            for lr in args.lrs:
                candidates.append({"method": m, "lr": lr, "options": options, "name": f"{m}_{len(candidates)}"})
    jobs = []
    for c in candidates:
        c["jsonl"] = str(sweep_dir / f"{c['name']}.jsonl")
        argv_c = [*base, "--methods", c["method"], "--seeds", "0", "--budgets", str(args.sweep_budget),
                  "--eval-split", "val", "--method-lr", f"{c['method']}={c['lr']}",
                  "--runs-jsonl", c["jsonl"], "--out", str(sweep_dir / f"{c['name']}.json")]
        if c["options"]:
            argv_c += ["--method-options", f"{c['method']}={json.dumps(c['options'])}"]
        jobs.append((c["name"], argv_c))
    print(f"phase A: {len(jobs)} candidates, {args.parallel} at a time", flush=True)
    t0 = time.monotonic()
    codes = run_pool(jobs, args.parallel, t0 + args.phase_a_s, sweep_dir / "logs")
    chosen = {}
    for c in candidates:
        runs = [r for r in read_runs([c["jsonl"]]) if r["status"] == "ok" and
                (r["budget"] is None or abs(r["budget"] - args.sweep_budget) < 1e-9)]
        c["val_acc"] = runs[0]["acc"] if runs else None
        c["exit"] = codes.get(c["name"])
        best = chosen.get(c["method"])
        if c["val_acc"] is not None and (best is None or c["val_acc"] > best["val_acc"]):
            chosen[c["method"]] = c
    phase_a_s = time.monotonic() - t0
    selection = {"sweep_budget": args.sweep_budget, "lrs": args.lrs, "phase_a_s": phase_a_s,
                 "candidates": [{k: c[k] for k in ("method", "lr", "options", "val_acc", "exit")} for c in candidates],
                 "chosen": {m: {"lr": c["lr"], "options": c["options"], "val_acc": c["val_acc"]}
                            for m, c in chosen.items()}}
    sel_path = out.with_name(out.stem + "_selection.json")
    utils.write_results(sel_path, selection["candidates"], kind="quality_selection", meta=selection)
    for alias, base_method in ALIASES.items():
        if alias in args.methods and base_method in chosen:
            chosen[alias] = {**chosen[base_method], "method": alias}
    for m in args.methods:
        c = chosen.get(m)
        print(f"  {m:12s} " + (f"lr {c['lr']:g} {c['options'] or ''} val acc {c['val_acc']:.3f}" if c else
                                "no finished candidate: left out of phase B"), flush=True)

    # Phase B: the grid on the test set
    grid_dir = args.workdir / "grid"
    order = sorted(chosen, key=lambda m: m == "dense")  # the longer joint runs first
    jobs = []
    for seed in args.seeds:
        for m in order:
            c = chosen[m]
            name = f"{m}_s{seed}"
            argv_g = [*base, "--methods", m, "--seeds", str(seed), "--budgets", *map(str, args.budgets),
                      "--method-lr", f"{m}={c['lr']}", "--runs-jsonl", str(grid_dir / f"{name}.jsonl"),
                      "--out", str(grid_dir / f"{name}.json")]
            if c["options"]:
                argv_g += ["--method-options", f"{m}={json.dumps(c['options'])}"]
            jobs.append((name, argv_g))
    print(f"phase B: {len(jobs)} runs, {args.parallel} at a time", flush=True)
    t1 = time.monotonic()
    run_pool(jobs, args.parallel, t1 + args.phase_b_s, grid_dir / "logs")
    files = sorted(str(p) for p in grid_dir.glob("*.jsonl"))
    if not files:
        print("phase B finished no run")
        return 1
    merge = [sys.executable, str(BENCH), "--merge", *files, "--out", str(out), *passthrough]
    print(f"phase B took {time.monotonic() - t1:.0f} s; merging {len(files)} files", flush=True)
    return subprocess.call(merge)


if __name__ == "__main__":
    sys.exit(main())
