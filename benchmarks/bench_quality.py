"""Quality at a budget: fine-tune the real MiniLM for a classification task and compress it, every method.

Task: Debian fortunes, the category of a quotation (``lrcomp.data.load_labeled_texts``); the
``--classes`` largest categories are kept, at most ``--per-class`` quotations each, split per
class into train / test with a fixed data seed (the split never changes with ``--seeds``).
``--data`` takes any labelled source of the loader (CSV / JSONL / HF dataset name).

Model: all-MiniLM-L6-v2 (``lrcomp.models.load_encoder``) + a linear head ``classifier`` on the
mean-pooled last hidden states, cross-entropy loss. Targets: every encoder ``nn.Linear``
(36: the pooler is excluded since mean pooling never uses it; the head is not targeted).
Budget b = fraction of the targeted linears' weights kept (compact count: ``r (K + N)`` against ``K N``,
biases not counted, as in ``lrcomp.Compressor``).

Methods, each run through :func:`run_method` with the same total number of optimizer steps:

- ``dense``: plain fine-tuning, no compression (the reference; one run per seed, any budget);
- ``seq_svd``, ``seq_svd_llm``: fine-tune ``--steps // 2`` steps, one-shot ``lrcomp.compress``
  (calibration = training batches), fine-tune the remaining steps (sequential baseline);
- the joint methods of ``lrcomp.methods.JOINT_METHODS`` (acip, pc_lora, tunecomp, jactus, lpaf)
  through ``lrcomp.Compressor`` with ``total_steps = --steps``. ACIP runs once per seed at the
  smallest budget and ``comp.materialize(b)`` gives every budget (reported as is, no re-training).

A method that does not exist yet or raises ``NotImplementedError`` is reported as skipped.
Results: ``benchmarks/results/quality_cpu.json`` (``quality_quick_cpu.json`` with ``--quick``) and
the PNG beside it (accuracy vs kept parameters); ``--save-dir`` keeps the most accurate model at the
smallest budget as safetensors with a JSON of its ranks. ``--runs-jsonl`` appends every finished
run to a file, and ``--merge`` aggregates such files: benchmarks/quality_sweep.py uses both to choose
each method's learning rate on a validation split and to run the grid in parallel processes.

    python benchmarks/bench_quality.py --quick        # one seed, budget 0.5, 200 steps: ~15-25 min on 2 cores
    python benchmarks/bench_quality.py                # 3 seeds x 3 budgets, 200 steps: several hours on 2 cores
    python benchmarks/quality_sweep.py --device cuda --parallel 15 -- ...   # selection + grid (~6 min, one H100)

The grid in the README (benchmarks/results/quality.json) was measured on the CPU with quality_sweep.py; the
README says what it shows, benchmarks/results/QUALITY.md how its choices were made and what else was tried.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402  (benchmarks/utils.py)

import lrcomp  # noqa: E402
from lrcomp.data import load_labeled_texts  # noqa: E402
from lrcomp.layers import LowRankLinear  # noqa: E402
from lrcomp.models import load_encoder, mean_pool  # noqa: E402
from lrcomp.replace import find_target_linears  # noqa: E402

DEFAULT_OUT = utils.RESULTS_DIR / "quality_cpu.json"
EXCLUDE = ["pooler.dense"]
SEQUENTIAL = {"seq_svd": "svd", "seq_svd_llm": "svd_llm"}
# The joint methods named by the issue; lrcomp.methods.JOINT_METHODS wins once it exists.
JOINT_DEFAULT = ("acip", "pc_lora", "tunecomp", "jactus", "lpaf")
# Methods where one run at the smallest budget gives every budget (comp.materialize).
ONE_RUN_ALL_BUDGETS = ("acip",)
# Bench-only names of a joint method run differently: ACIP trained to each budget separately (the
# comparison at equal training per budget), beside "acip" (one run, every budget materialised from it).
ALIASES = {"acip_per_budget": "acip"}
# Keys of --method-options that set CompressionConfig fields instead of the method's own options.
CONFIG_KEYS = ("feature_weight", "distill_weight", "distill_temperature", "other_lr")
# Learning rates chosen per method at budget 0.5 on a validation split (benchmarks/quality_sweep.py phase A
# on the CPU, 200 steps, seed 0, among 1e-4 / 5e-4 / 2e-3: benchmarks/results/quality_selection.json, which also
# holds the choices at 0.8 and 0.3 that the sweep passes explicitly); a method not listed uses --lr.
# --method-lr overrides them.
DEFAULT_METHOD_LR = {"dense": 1e-4, "seq_svd": 1e-4, "seq_svd_llm": 1e-4, "acip": 2e-3, "pc_lora": 5e-4,
                     "tunecomp": 1e-4, "jactus": 5e-4, "lpaf": 5e-4}
# other_lr the bench and the sweep give (a one-run method, ACIP's default options, the sweep's candidates): the dense lr
DENSE_OTHER_LR = DEFAULT_METHOD_LR["dense"]
# Method options the bench uses unless --method-options says otherwise: each method's choice at budget 0.5 in
# benchmarks/results/quality_selection.json (with the lrs above; tests/test_bench_quality.py keeps the two in step),
# so that --quick, the README's main job, runs every method as the table's 0.5 column does. Why each option is
# there: benchmarks/results/QUALITY.md. The sweep's candidates (quality_sweep.BASE_OPTIONS, EXTRA_OPTIONS) are
# written out there and do not move with these defaults.
DEFAULT_METHOD_OPTIONS = {"acip": {"basis": "svd_llm", "other_lr": DENSE_OTHER_LR, "feature_weight": 1.0},
                          "pc_lora": {"init": "svd_llm", "decay_ratio": 0.25},
                          "tunecomp": {"feature_weight": 1.0},
                          "jactus": {"warmup_frac": 0.5, "grad_metric": 0.5},
                          "lpaf": {"prune_score": "first_order", "input_metric": True, "feature_weight": 1.0}}
DATA_SEED = 1234  # fixes the train/test split, independent of the run seeds
# Seconds per training step of the joint methods relative to a dense step, used only for the
# time estimate printed before the grid (a guess until they have been measured).
JOINT_STEP_COST = 1.5


class SkipMethod(Exception):
    """The method cannot run here (not implemented yet): reported as skipped, the grid goes on."""


class MeanPoolClassifier(nn.Module):
    """``logits [B, C] = classifier(mean_pool(encoder(x).last_hidden_state))``; with ``labels`` also the CE loss.

    Called like a HF model (``model(**batch)``); returns ``SimpleNamespace(logits, loss)``. The head is
    named ``classifier`` so that ``target_modules="all-linear"`` leaves it dense.
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        logits = self.classifier(mean_pool(hidden, attention_mask))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


def classification_loss(outputs, batch):
    """``(outputs, batch) -> scalar``: the loss convention of lrcomp (calibrate, Compressor)."""
    return F.cross_entropy(outputs.logits, batch["labels"])


@dataclass
class Task:
    """Tokenised train / test data and the base model, shared by every run."""

    encoder: nn.Module
    tokenizer: object
    train_texts: list[str]
    train_labels: list[int]
    test_batches: list[dict]
    label_names: list[str]
    args: argparse.Namespace
    targets: list[str] = field(default_factory=list)
    dense_target_params: int = 0

    def batches(self, seed: int):
        """Endless training batches (dicts with ``labels``), reshuffled each epoch, deterministic in ``seed``."""
        g = torch.Generator().manual_seed(seed)
        n, bs = len(self.train_texts), self.args.batch_size
        while True:
            perm = torch.randperm(n, generator=g).tolist()
            for s in range(0, n - bs + 1, bs):
                ids = perm[s:s + bs]
                yield self.encode([self.train_texts[i] for i in ids], [self.train_labels[i] for i in ids])

    def encode(self, texts: list[str], labels: list[int]) -> dict:
        """Token ids, masks and ``labels`` of ``texts``, on ``--device``."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.args.max_length,
                             return_tensors="pt")
        return {k: v.to(self.args.device) for k, v in {**enc, "labels": torch.tensor(labels)}.items()}

    def fresh_model(self, seed: int) -> MeanPoolClassifier:
        """The pretrained encoder (a copy) + a head initialised from ``seed`` (on the CPU, then moved)."""
        torch.manual_seed(seed)
        head = nn.Linear(self.encoder.config.hidden_size, len(self.label_names))
        model = MeanPoolClassifier(copy.deepcopy(self.encoder), len(self.label_names))
        model.classifier = head.to(self.args.device)
        return model.train()


def load_task(args) -> Task:
    """The K largest categories, at most ``per_class`` texts each, split per class (fixed seed).

    With ``--eval-split val`` a further ``--val-fraction`` of each class moves from train to a
    validation set that replaces the test set (for choosing hyperparameters; the test set is untouched).
    """
    texts, labels, names = load_labeled_texts(args.data, seed=DATA_SEED, min_chars=20, max_chars=400)
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    keep = sorted(counts, key=lambda y: (-counts[y], names[y]))[:args.classes]
    if len(keep) < 2:
        raise ValueError(f"--data has {len(keep)} class(es) with texts; a classification task needs at least 2")
    remap = {y: i for i, y in enumerate(sorted(keep, key=lambda y: names[y]))}
    per_class: dict[int, list[str]] = {y: [] for y in keep}
    for t, y in zip(texts, labels, strict=True):  # already shuffled with DATA_SEED
        if y in per_class and len(per_class[y]) < args.per_class:
            per_class[y].append(t)
    train, test = [], []
    for y, items in per_class.items():
        n_test = max(1, round(len(items) * args.test_fraction))
        n_val = max(1, round(len(items) * args.val_fraction)) if args.eval_split == "val" else 0
        held_out = items[:n_test] if n_val == 0 else items[n_test:n_test + n_val]
        test += [(t, remap[y]) for t in held_out]
        train += [(t, remap[y]) for t in items[n_test + n_val:]]
    encoder, tokenizer = load_encoder(args.model, device=args.device)
    task = Task(encoder=encoder, tokenizer=tokenizer, train_texts=[t for t, _ in train],
                train_labels=[y for _, y in train], test_batches=[],
                label_names=[names[y] for y in sorted(keep, key=lambda y: names[y])], args=args)
    task.test_batches = [task.encode([t for t, _ in test[s:s + 64]], [y for _, y in test[s:s + 64]])
                         for s in range(0, len(test), 64)]
    probe = task.fresh_model(0)
    task.targets = find_target_linears(probe, "all-linear", EXCLUDE)
    task.dense_target_params = target_params(probe, task.targets)
    return task


def target_params(model: nn.Module, names: list[str]) -> int:
    """Weights the targeted layers keep as deployed: ``active_rank (K + N)`` (+ LoRA / live dense branch) for a
    low-rank layer, ``K N`` for a dense one. Biases are left out (never compressed), as in the budget of
    ``lrcomp.Compressor`` and the one-shot allocator."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            total += module.num_parameters(compact=True) - (module.out_features if module.bias is not None else 0)
        else:
            total += module.in_features * module.out_features
    return total


def layer_ranks(model: nn.Module, names: list[str]) -> dict[str, int | str]:
    out = {}
    for name in names:
        module = model.get_submodule(name)
        out[name] = module.active_rank if isinstance(module, LowRankLinear) else "dense"
    return out


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[dict]) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        pred = model(**inputs).logits.argmax(-1)
        correct += int((pred == batch["labels"]).sum())
        total += len(batch["labels"])
    model.train(was_training)
    return correct / total


def schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float = 0.1):
    """Linear warm-up over ``warmup_fraction`` of the steps, then linear decay to 0."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(model: nn.Module, batches, steps: int, lr: float, desc: str, *, params=None,
                loss_hook=None, step_hook=None, attach=None) -> None:
    """``steps`` AdamW steps on ``next(batches)``; ``loss_hook(loss, batch, out)`` may add terms."""
    if steps <= 0:
        return
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if attach is not None:
        attach(opt)
    sched = schedule(opt, steps)
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True)
    for _ in bar:
        batch = next(batches)
        out = model(**batch)
        loss = out.loss if loss_hook is None else loss_hook(out.loss, batch, out)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step_hook is not None:
            step_hook()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def joint_methods() -> tuple[str, ...]:
    methods = getattr(lrcomp, "methods", None)
    return tuple(getattr(methods, "JOINT_METHODS", JOINT_DEFAULT)) if methods is not None else JOINT_DEFAULT


def method_lr(args, name: str) -> float:
    """The learning rate of bench method ``name``: its own, else its base method's (aliases), else ``--lr``."""
    return args.method_lr.get(name, args.method_lr.get(ALIASES.get(name, name), args.lr))


def method_options(args, name: str, budgets: list[float] | None = None) -> dict:
    """The CompressionConfig.method_options of bench method ``name`` (aliases fall back to their base method);
    ``budgets``: those a one-run method materialises."""
    options = dict(args.method_options.get(name, args.method_options.get(ALIASES.get(name, name), {})))
    return one_run_options(name, options, budgets)


def one_run_options(name: str, options: dict, budgets: list[float] | None) -> dict:
    """``options`` of a one-run method that serves several ``budgets``: ACIP's one run also trains at the larger
    budgets it materialises (option ``curve_budgets``, not in the paper) and trains the parameters outside the
    targeted layers at ``DENSE_OTHER_LR`` (``CompressionConfig.other_lr``), each unless ``options`` set it.

    Both chosen on validation of the one run itself (seeds 0-2, lr 2e-3). curve_budgets: mean over 0.8 / 0.5 /
    0.3 0.736 against 0.733 without (raw/quality_cpu_val_acip_curve.jsonl). other_lr 1e-4 (with curve_budgets):
    0.767 / 0.741 / 0.727 against 0.742 / 0.729 / 0.714 without (raw/quality_cpu_val_acip_other_lr.jsonl); the
    sweep's per-budget candidates (seed 0) agreed at 0.8 and 0.5 (0.762 / 0.740 against 0.749 / 0.738) and not
    at 0.3 (0.709 against 0.736), the budget the one run's lr and basis come from."""
    if name in ONE_RUN_ALL_BUDGETS and budgets and len(set(budgets)) > 1:
        extra = {"curve_budgets": sorted(set(budgets) - {min(budgets)}, reverse=True), "other_lr": DENSE_OTHER_LR}
        return {**extra, **options}
    return options


def _make_compressor(model, name: str, budget: float, task: Task, seed: int, budgets: list[float] | None = None):
    """``lrcomp.Compressor`` for a joint method, or SkipMethod when the framework or the method is missing."""
    method = ALIASES.get(name, name)
    if not hasattr(lrcomp, "Compressor"):
        raise SkipMethod("lrcomp.Compressor does not exist yet")
    names = getattr(getattr(lrcomp, "methods", None), "JOINT_METHODS", None)
    if names is not None and method not in names:
        raise SkipMethod(f"{method!r} is not in lrcomp.methods.JOINT_METHODS {tuple(names)}")
    # distill_weight=0: the teacher is the pretrained encoder with an untrained head, whose logits carry
    # no task knowledge (logit KD to it pulls the student towards a random classifier); the methods
    # that distil keep their feature distillation to the pretrained representations.
    options = method_options(task.args, name, budgets)
    # keys that are CompressionConfig fields (e.g. feature_weight) go to the config, the rest to the method
    overrides = {k: options.pop(k) for k in CONFIG_KEYS if k in options}
    config = lrcomp.CompressionConfig(method=method, budget=budget, total_steps=task.args.steps,
                                      exclude_modules=EXCLUDE, **{"distill_weight": 0.0, **overrides},
                                      method_options=options)
    calib = [b for _, b in zip(range(task.args.calib_batches), task.batches(seed + 10_000), strict=False)]
    return lrcomp.Compressor(model, config, calib_data=calib, loss_fn=classification_loss, teacher=None)


def run_method(name: str, budget: float | None, seed: int, task: Task,
               budgets: list[float] | None = None) -> list[dict]:
    """Run one method once and return result rows ``{budget, acc, kept, wall_s, model}``.

    ``budget`` is None for dense. For ACIP ``budgets`` lists every budget to materialise from the
    single run (at ``budget``, the smallest). Raises :class:`SkipMethod` when the method cannot run.
    """
    args = task.args
    lr = method_lr(args, name)
    t0 = time.perf_counter()
    batches = task.batches(seed)
    model = task.fresh_model(seed)
    if name == "dense":
        train_steps(model, batches, args.steps, lr, f"dense s{seed}")
        return [{"budget": None, "acc": accuracy(model, task.test_batches), "kept": 1.0,
                 "wall_s": time.perf_counter() - t0, "model": model}]
    if name in SEQUENTIAL:
        first = args.steps // 2
        train_steps(model, batches, first, lr, f"{name} b{budget} s{seed} ft1")
        calib = [next(batches) for _ in range(args.calib_batches)]
        config = lrcomp.CompressionConfig(method=SEQUENTIAL[name], budget=budget, exclude_modules=EXCLUDE)
        model = lrcomp.compress(model, config, calib)
        train_steps(model, batches, args.steps - first, lr, f"{name} b{budget} s{seed} ft2")
        return [{"budget": budget, "acc": accuracy(model, task.test_batches),
                 "kept": target_params(model, task.targets) / task.dense_target_params,
                 "wall_s": time.perf_counter() - t0, "model": model}]
    if ALIASES.get(name, name) not in joint_methods():
        raise ValueError(f"unknown method {name!r}; known: dense, {', '.join(SEQUENTIAL)}, "
                         f"{', '.join(joint_methods())}, {', '.join(ALIASES)}")
    comp = _make_compressor(model, name, budget, task, seed, budgets)
    params = list(comp.parameters())

    def loss_hook(task_loss, batch, out):
        return comp.loss(task_loss, inputs=batch, outputs=out)

    train_steps(model, batches, args.steps, lr, f"{name} b{budget} s{seed}", params=params,
                loss_hook=loss_hook, step_hook=comp.step, attach=comp.attach)
    train_s = time.perf_counter() - t0
    rows = []
    if name in ONE_RUN_ALL_BUDGETS and budgets:
        # Compressor.materialize per the issue; the ACIP method object has it until the Compressor forwards it
        materialize = getattr(comp, "materialize", None) or getattr(getattr(comp, "method", None), "materialize", None)
        if materialize is None:
            raise SkipMethod(f"{name}: the Compressor has no materialize(budget) yet")
        for b in sorted(budgets, reverse=True):
            t1 = time.perf_counter()
            compact = materialize(b)
            rows.append({"budget": b, "acc": accuracy(compact, task.test_batches),
                         "kept": target_params(compact, task.targets) / task.dense_target_params,
                         # the one training run serves every budget: its time + this materialisation
                         "wall_s": train_s + time.perf_counter() - t1, "model": compact, "shared_run": True})
        return rows
    final = comp.finalize()
    return [{"budget": budget, "acc": accuracy(final, task.test_batches),
             "kept": target_params(final, task.targets) / task.dense_target_params,
             "wall_s": time.perf_counter() - t0, "model": final}]


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def plan(methods: list[str], budgets: list[float]) -> list[tuple[str, float | None, list[float] | None]]:
    """(method, budget, budgets to materialise) per run and seed."""
    runs = []
    for m in methods:
        if m == "dense":
            runs.append((m, None, None))
        elif m in ONE_RUN_ALL_BUDGETS:
            runs.append((m, min(budgets), budgets))
        else:
            runs += [(m, b, None) for b in budgets]
    return runs


def _probe_step_time(task: Task, steps: int = 3) -> float:
    """Seconds of one dense training step (forward + backward + AdamW) on a training batch."""
    model = task.fresh_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    batches = task.batches(0)
    times = []
    sync = torch.cuda.synchronize if str(task.args.device).startswith("cuda") else (lambda: None)
    for _ in range(steps + 1):
        batch = next(batches)
        sync()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def save_best(best: dict, task: Task, directory: Path) -> None:
    """The encoder as a Hugging Face checkpoint (``AutoModel.from_pretrained(directory / "encoder")`` after
    ``import lrcomp``), the head as ``head.safetensors`` and what the run was in ``ranks.json``."""
    from safetensors.torch import save_file

    from lrcomp.atomic import write_json
    from lrcomp.integrations.hf import mark_lowrank

    directory.mkdir(parents=True, exist_ok=True)
    model = best["model"].to("cpu")
    encoder = mark_lowrank(model.encoder) if any(isinstance(m, LowRankLinear) for m in model.modules()) \
        else model.encoder
    encoder.save_pretrained(directory / "encoder")
    task.tokenizer.save_pretrained(directory / "encoder")
    head = {k: v.contiguous() for k, v in model.classifier.state_dict().items()}
    save_file(head, str(directory / "head.safetensors"))
    meta = {"method": best["method"], "budget": best["budget"], "seed": best["seed"], "acc": best["acc"],
            "params_kept_fraction": best["kept"], "labels": task.label_names,
            "base_model": task.args.model or "all-MiniLM-L6-v2", "max_length": task.args.max_length,
            "pooling": "mean over the attention mask", "ranks": layer_ranks(model, task.targets)}
    write_json(directory / "ranks.json", meta)
    print(f"saved {best['method']} (budget {best['budget']}, seed {best['seed']}, acc {best['acc']:.3f}) "
          f"to {directory}: encoder/ (AutoModel.from_pretrained after import lrcomp), head.safetensors, ranks.json")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy vs kept fraction of the targeted parameters (:func:`lrcomp.plots.quality_figure`), saved atomically."""
    from lrcomp.plots import quality_figure

    utils.save_figure(quality_figure(rows, title), path)


def aggregate(results: dict, seeds: list[int], steps: int) -> list[dict]:
    """One row per (method, budget) from ``results[(method, budget)] = {"runs": [...], "status", "reason"}``."""
    rows = []
    for (method, budget), entry in results.items():
        runs = entry["runs"]
        accs = [r["acc"] for r in runs]
        row = {"method": method, "budget": budget, "seeds": [r["seed"] for r in runs] or seeds,
               "n_seeds": len(runs), "steps": steps, "status": entry["status"], "reason": entry.get("reason"),
               "acc_mean": statistics.fmean(accs) if accs else None,
               "acc_std": statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None),
               "acc_per_seed": accs, "device_per_seed": [r.get("device") for r in runs],
               "params_kept_fraction": statistics.fmean(r["kept"] for r in runs) if runs else None,
               "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs) if runs else None,
               "shared_run": any(r.get("shared_run") for r in runs)}
        row["seeds_str"] = " ".join(map(str, row["seeds"]))
        row["note"] = entry.get("reason") or ("one run, materialize(b)" if row["shared_run"] else "")
        rows.append(row)
    paired_vs_sequential(rows)
    return rows


def paired_vs_sequential(rows: list[dict]) -> None:
    """Add to each compressed, non-sequential row its accuracy minus the best sequential baseline's (the
    baseline with the higher mean at that budget), paired by seed: a seed fixes the head's init and the batch
    order of every method, so the per-seed difference is less noisy than the two means. Only runs of the same
    seed on the same device are paired. Sets ``vs_seq_mean``, ``vs_seq_std`` (over the pairs; 0 for one),
    ``vs_seq_p`` (``sign_flip_p`` of the pairs) and ``vs_seq_baseline``; None where there is no baseline row or
    no pair."""
    cells = {(r["method"], r["budget"]): r for r in rows}
    for row in rows:
        row.update(vs_seq_mean=None, vs_seq_std=None, vs_seq_p=None, vs_seq_baseline=None)
        if row["budget"] is None or row["method"] in SEQUENTIAL:
            continue
        bases = [cells[(m, row["budget"])] for m in SEQUENTIAL if (m, row["budget"]) in cells]
        bases = [b for b in bases if b["acc_mean"] is not None]
        if not bases:
            continue
        best = max(bases, key=lambda b: b["acc_mean"])
        # (a row without runs lists the planned seeds and no accuracies: zip stops at the shortest)
        base_acc = {(seed, device): acc for seed, device, acc
                    in zip(best["seeds"], best["device_per_seed"], best["acc_per_seed"], strict=False)}
        diffs = [acc - base_acc[(seed, device)] for seed, device, acc
                 in zip(row["seeds"], row["device_per_seed"], row["acc_per_seed"], strict=False)
                 if (seed, device) in base_acc]
        if diffs:
            row.update(vs_seq_mean=statistics.fmean(diffs),
                       vs_seq_std=statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                       vs_seq_p=sign_flip_p(diffs), vs_seq_baseline=best["method"])


MAX_SIGN_FLIPS = 20  # 2^20 sign patterns: the exact test's limit


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided p-value of the exact paired sign-flip test that the per-seed differences ``diffs`` center on 0.

    Under that null hypothesis each difference is as likely to have either sign, so the 2^n sign patterns
    of n differences are equally likely; p is the fraction of them whose |sum| is at least the observed
    |sum| (the observed pattern and its mirror included, so p >= 2 / 2^n unless every difference is 0).
    Exact, and assumes no distribution: with 5 seeds no p can be under 0.0625, with 7 under 0.016."""
    n = len(diffs)
    if not 1 <= n <= MAX_SIGN_FLIPS:
        raise ValueError(f"sign_flip_p takes 1 to {MAX_SIGN_FLIPS} differences, got {n}")
    observed = abs(sum(diffs))
    slack = 1e-9 * sum(abs(d) for d in diffs)  # the same sum reached in another order of additions
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - slack
               for signs in itertools.product((1.0, -1.0), repeat=n))
    return hits / 2 ** n


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected METHOD=VALUE, got {text!r}")
    return key, value


def report(rows: list[dict], meta: dict, args, env: dict | None = None) -> None:
    """Write ``--out`` (rows + meta; ``env`` default: this machine), its plot, and print the table."""
    utils.write_results(args.out, rows, env=env, meta=meta)
    seeds = sorted({s for r in rows for s in r["seeds"]})
    plot(rows, args.plot or args.out.with_suffix(".png"),
         f"MiniLM + linear head, {len(meta['classes'])} fortune categories, {meta['steps']} steps, "
         f"seeds {' '.join(map(str, seeds))}")
    print()
    print(utils.format_table(rows, ["method", "budget", "seeds_str", "acc_mean", "acc_std", "vs_seq_mean", "vs_seq_p",
                                    "params_kept_fraction", "wall_s_mean", "lr", "status", "note"], floatfmt=".3g"))


def merge(args) -> int:
    """``--merge``: aggregate the run lines of several ``--runs-jsonl`` files (one grid split over processes)."""
    records = []
    for path in args.merge:
        with open(path, encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()]
    if not records:
        raise SystemExit(f"--merge: no runs in {[str(p) for p in args.merge]}")
    results: dict = {}
    settings: dict = {}
    for rec in records:
        if rec["status"] == "ok":  # one cell, one set of hyperparameters
            cell, got = (rec["method"], rec["budget"]), (rec["lr"], json.dumps(rec["options"], sort_keys=True))
            if settings.setdefault(cell, got) != got:
                raise SystemExit(f"--merge: {cell[0]} at budget {cell[1]} mixes runs with lr/options "
                                 f"{settings[cell]} and {got}")
        entry = results.setdefault((rec["method"], rec["budget"]), {"runs": [], "status": "ok"})
        if rec["status"] == "ok":
            entry["runs"].append(rec)
        elif not entry["runs"]:
            entry.update(status=rec["status"], reason=rec.get("reason"))
    seeds = sorted({r["seed"] for r in records})
    steps = {r["steps"] for r in records}
    if len(steps) != 1:
        raise SystemExit(f"--merge: the files mix runs of {sorted(steps)} steps")
    known = ["dense", *SEQUENTIAL, *joint_methods(), *ALIASES]
    rank = {m: i for i, m in enumerate(known)}

    def order(item):  # dense, the baselines, the joint methods, anything else; budgets large to small
        (method, budget), _ = item
        return rank.get(method, len(known)), method, -(budget or 2.0)

    rows = aggregate(dict(sorted(results.items(), key=order)), seeds, steps.pop())
    for row in rows:  # the hyperparameters of the cell's runs (the same for all of them, checked above)
        runs = [r for r in records if r["method"] == row["method"] and r["budget"] == row["budget"]
                and r["status"] == "ok"]
        row["lr"] = runs[0]["lr"] if runs else None
        row["options"] = runs[0]["options"] if runs else None
        row["device"] = ", ".join(sorted({r["device"] for r in runs})) or None
    first = records[0]
    meta = {"task": "fortunes categories" if args.data is None else str(args.data), "classes": first["classes"],
            "n_train": first["n_train"], "n_eval": first["n_eval"], "eval_split": first["eval_split"],
            "steps": first["steps"], "batch_size": first["batch_size"], "max_length": first["max_length"],
            "devices": sorted({r["device"] for r in records}),
            "dense_step_s": {d: next(r["dense_step_s"] for r in records if r["device"] == d)
                             for d in sorted({r["device"] for r in records})},
            "merged_from": [str(p) for p in args.merge],
            "sequential_split": "steps // 2 before compression, the rest after"}
    for row in rows:
        runs = [r for r in records if r["method"] == row["method"] and r["status"] == "ok"]
        row["device_name"] = ", ".join(sorted({r.get("device_name", r["device"]) for r in runs})) or None
    env = utils.environment()
    env.update(device="per row (the merged runs ran on: " + ", ".join(meta["devices"]) + ")", torch="per run",
               triton=None, cuda=None, gpu=None, cpu=None, cpu_threads=None, load_avg_1m=None)
    report(rows, meta, args, env=env)
    print(f"\nmerged {len(records)} runs; wrote {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local HF model folder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--data", default=None, help="labelled source of lrcomp.data (default: Debian fortunes)")
    parser.add_argument("--classes", type=int, default=6, help="keep the K largest classes")
    parser.add_argument("--per-class", type=int, default=500, help="at most this many texts per class")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="subset of: dense seq_svd seq_svd_llm and the joint methods (default: all)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="kept fractions of the targeted parameters (default: 0.8 0.5 0.3; --quick: 0.5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run, the same total for every method (default: 200)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="AdamW learning rate (peak of warm-up + linear decay) of a method without its own")
    parser.add_argument("--method-lr", nargs="+", default=[], metavar="METHOD=LR",
                        help=f"per-method learning rates, e.g. pc_lora=1e-3 (defaults: {DEFAULT_METHOD_LR})")
    parser.add_argument("--method-options", nargs="+", default=[], metavar="METHOD=JSON",
                        help='options of a joint method (CompressionConfig.method_options), e.g. '
                             f'lpaf=\'{{"prune_score": "movement"}}\'; the keys {CONFIG_KEYS} set CompressionConfig '
                             f'fields instead (defaults: {DEFAULT_METHOD_OPTIONS})')
    parser.add_argument("--device", default="cpu", help="torch device of the runs, e.g. cuda")
    parser.add_argument("--eval-split", choices=("test", "val"), default="test",
                        help="val: hold out --val-fraction of the training texts and report accuracy on them "
                             "(to choose hyperparameters without looking at the test set)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--runs-jsonl", type=Path, default=None,
                        help="append one JSON line per finished run here (several processes can share a grid)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSONL",
                        help="run nothing: aggregate the runs of these --runs-jsonl files into --out and its plot")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--calib-batches", type=int, default=8, help="training batches used for calibration")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="one seed, budget 0.5 (~15-25 minutes with every method)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--save-dir", type=Path, default=None,
                        help="save the most accurate compressed model at the smallest budget here")
    args = parser.parse_args(argv)
    try:
        args.method_lr = {**DEFAULT_METHOD_LR, **{k: float(v) for k, v in (_key_value(x) for x in args.method_lr)}}
        args.method_options = {**DEFAULT_METHOD_OPTIONS,
                               **{k: json.loads(v) for k, v in (_key_value(x) for x in args.method_options)}}
    except (ValueError, json.JSONDecodeError) as err:
        parser.error(f"--method-lr / --method-options: {err}")
    if args.merge is not None:
        return merge(args)
    if args.quick and args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT.with_name("quality_quick_cpu.json")
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.budgets is None:
        args.budgets = [0.5] if args.quick else [0.8, 0.5, 0.3]
    if args.steps is None:
        # A dense step (batch 16 x 48 tokens) takes ~0.35 s on 2 quiet cores, a joint step 1-2 s; below ~200
        # steps the joint methods have not left chance level (32 steps measured: all at chance).
        args.steps = 200
    for b in args.budgets:
        if not 0 < b <= 1:
            parser.error(f"--budgets values must be in (0, 1], got {b}")
    for name in ("steps", "batch_size", "max_length", "classes", "per_class", "calib_batches", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    known = ["dense", *SEQUENTIAL, *joint_methods(), *ALIASES]
    # by default every method; ACIP per budget only when there is more than one budget (else it is "acip")
    methods = args.methods or [m for m in known if m not in ALIASES or len(set(args.budgets)) > 1]
    unknown = [m for m in methods if m not in known]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {known}")
    budgets = sorted(set(args.budgets), reverse=True)
    torch.set_num_threads(args.threads)

    task = load_task(args)
    print(f"task: {len(task.label_names)} classes {task.label_names}; {len(task.train_texts)} train / "
          f"{sum(len(b['labels']) for b in task.test_batches)} test texts; {len(task.targets)} target linears "
          f"({task.dense_target_params:,} params); {torch.get_num_threads()} threads")
    runs = plan(methods, budgets)
    step_s = _probe_step_time(task)
    cost = sum(JOINT_STEP_COST if ALIASES.get(m, m) in joint_methods() else 1.0 for m, _, _ in runs)
    estimate = cost * args.steps * step_s * len(args.seeds)
    print(f"{len(runs) * len(args.seeds)} runs of {args.steps} steps (batch {args.batch_size}, {args.max_length} "
          f"tokens); dense step {step_s:.2f} s -> estimated {estimate / 60:.1f} min "
          f"(joint methods counted at {JOINT_STEP_COST}x a dense step)")

    env = utils.environment()

    def log_run(record: dict) -> None:
        if args.runs_jsonl is not None:
            record = {**record, "lr": method_lr(args, record["method"]),
                      "options": method_options(args, record["method"], budgets), "eval_split": args.eval_split,
                      "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                      "device": str(args.device), "device_name": env["device"], "torch": env["torch"],
                      "commit": env["commit"], "classes": task.label_names, "n_train": len(task.train_texts),
                      "n_eval": sum(len(b["labels"]) for b in task.test_batches), "dense_step_s": step_s}
            args.runs_jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(args.runs_jsonl, "a", encoding="utf-8") as f:  # one line per run: a crash loses one run
                f.write(json.dumps(record) + "\n")

    results: dict = {}
    for m, b, bs in runs:
        for key_b in (bs or [b]):
            results[(m, key_b)] = {"runs": [], "status": "ok"}
    best = None
    smallest = min(budgets)
    wall0 = time.perf_counter()
    outer = tqdm([(seed, r) for seed in args.seeds for r in runs], desc="runs", unit="run", dynamic_ncols=True)
    for seed, (m, b, bs) in outer:
        outer.set_postfix_str(f"{m} b={b} seed={seed}")
        keys = [(m, x) for x in (bs or [b])]
        if any(results[k]["status"] == "skipped" for k in keys):
            continue  # skipped for one seed: skipped for all
        try:
            out = run_method(m, b, seed, task, budgets=bs)
        except (SkipMethod, NotImplementedError) as err:
            for k in keys:
                results[k].update(status="skipped", reason=_reason(err))
                log_run({"method": m, "budget": k[1], "seed": seed, "status": "skipped", "reason": _reason(err)})
            tqdm.write(f"skipped {m} (budget {b}): {_reason(err)}")
            continue
        except Exception as err:  # one broken method must not lose the rest of the grid
            for k in keys:
                results[k].update(status="failed", reason=_reason(err))
                log_run({"method": m, "budget": k[1], "seed": seed, "status": "failed", "reason": _reason(err)})
            tqdm.write(f"FAILED {m} (budget {b}, seed {seed}):\n{traceback.format_exc()}")
            continue
        for r in out:
            results[(m, r["budget"])]["runs"].append({**{k: v for k, v in r.items() if k != "model"}, "seed": seed})
            log_run({"method": m, "status": "ok", "seed": seed, **{k: v for k, v in r.items() if k != "model"}})
            tqdm.write(f"{m:12s} budget {r['budget']!s:5s} seed {seed}: acc {r['acc']:.4f}  kept {r['kept']:.3f}  "
                       f"{r['wall_s']:.1f} s")
            if args.save_dir is not None and r["budget"] == smallest and (best is None or r["acc"] > best["acc"]):
                best = {**r, "method": m, "seed": seed, "model": copy.deepcopy(r["model"]).eval()}
        del out
    total_s = time.perf_counter() - wall0

    rows = aggregate(results, args.seeds, args.steps)
    for row in rows:
        row["lr"] = method_lr(args, row["method"])
        row["options"] = method_options(args, row["method"], budgets)
    meta = {"task": "fortunes categories" if args.data is None else str(args.data), "classes": task.label_names,
            "n_train": len(task.train_texts), "n_test": sum(len(b["labels"]) for b in task.test_batches),
            "eval_split": args.eval_split, "steps": args.steps, "lr": args.lr, "method_lr": args.method_lr,
            "method_options": args.method_options, "batch_size": args.batch_size, "max_length": args.max_length,
            "device": str(args.device), "seeds": args.seeds, "targets": len(task.targets),
            "target_params": task.dense_target_params, "dense_step_s": step_s, "total_wall_s": total_s,
            "quick": args.quick, "sequential_split": "steps // 2 before compression, the rest after"}
    report(rows, meta, args)
    print(f"\ntotal {total_s / 60:.1f} min; wrote {args.out}")
    if args.save_dir is not None:
        if best is None:
            print(f"--save-dir: no compressed model ran at budget {smallest}; nothing saved")
        else:
            save_best(best, task, args.save_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
