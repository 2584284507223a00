"""One-shot compression on the real MiniLM: factorisations, global vs uniform allocation, latency cost.

Data: Debian fortunes with their categories (``lrcomp.data.load_labeled_texts``), split into a
calibration set and a held-back set. Gradient statistics (fisher, grad_cov) come from a real
task loss: a supervised contrastive loss on the sentence embeddings, positives being
quotations of the same category (Khosla et al. 2020), so the model needs no new head.

Three experiments, written to ``benchmarks/results/compress_*.json``:

1. ``compress_factorizations``: per-layer relative output error
   ``||X W^T - X W_r^T||_F / ||X W^T||_F`` on the held-back activations X, at equal rank (each
   layer keeps half its parameters), for svd, asvd, fwsvd, svd_llm, sparsity_aware and
   jactus_union (mean over the 6 blocks per layer kind, and how often each method is best).
2. ``compress_allocation``: svd_llm with a uniform allocation, the global allocator, and the
   global allocator with loss-sensitivity weights (``sensitivity=True``: each layer's scores
   times ``tr(G)/N`` of its output-gradient covariance) at budgets 0.8 / 0.5 / 0.3: total
   output error (sum over layers of squared errors over the sum of squared outputs,
   held-back activations of the dense model) and the cosine of the compressed model's
   sentence embeddings to the dense ones on the held-back sentences.
3. ``compress_latency``: a CPU latency table measured here (``measure_latency_table``), then
   svd_llm (global, sensitivity-weighted) at budget 0.5 of the latency vs 0.5 of the parameters:
   ranks chosen per layer kind, parameters kept, measured forward time of the whole model and embedding cosine.

    python benchmarks/bench_compress.py            # about 3-6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402  (benchmarks/utils.py)

import lrcomp  # noqa: E402
from lrcomp.calib.calibrate import calibrate  # noqa: E402
from lrcomp.compression.cost import measure_latency_table  # noqa: E402
from lrcomp.compression.factorizations import factorize  # noqa: E402
from lrcomp.data import load_labeled_texts  # noqa: E402
from lrcomp.layers import LowRankLinear  # noqa: E402
from lrcomp.models import load_encoder, mean_pool  # noqa: E402
from lrcomp.replace import find_target_linears  # noqa: E402

METHODS = ("svd", "asvd", "fwsvd", "svd_llm", "sparsity_aware", "jactus_union")
METHOD_STATS = ("input_cov", "input_abs_mean", "fisher", "grad_cov")


class ContrastiveEncoder(nn.Module):
    """A sentence encoder with a supervised contrastive loss, called like a HF model: ``model(**batch)``.

    ``embeddings [B, H]`` = L2-normalised mean pooling; with ``labels [B]`` the loss is
    ``-mean_i mean_{p: y_p = y_i, p != i} log softmax_j!=i(e_i . e_j / tau)[p]`` over anchors
    that have a positive.
    """

    def __init__(self, encoder: nn.Module, tau: float = 0.05):
        super().__init__()
        self.encoder = encoder
        self.tau = tau

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        emb = F.normalize(mean_pool(hidden, attention_mask), dim=-1)
        loss = None
        if labels is not None:
            sim = emb @ emb.t() / self.tau
            eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
            logp = sim.masked_fill(eye, float("-inf")).log_softmax(dim=1)
            pos = (labels[:, None] == labels[None, :]) & ~eye
            has = pos.any(1)
            loss = -(logp.masked_fill(~pos, 0).sum(1)[has] / pos.sum(1)[has]).mean()
        return SimpleNamespace(embeddings=emb, loss=loss)


def make_batches(tokenizer, texts, labels, batch_size, max_length, seed=0):
    """Dict batches of ``batch_size`` sentences, 4 per category where possible (so the loss has positives)."""
    g = torch.Generator().manual_seed(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    order = []
    for idx in by_label.values():
        perm = torch.randperm(len(idx), generator=g).tolist()
        order += [[idx[p] for p in perm[i:i + 4]] for i in range(0, len(idx), 4)]
    chunks = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    flat = [i for chunk in chunks for i in chunk]
    batches = []
    for s in range(0, len(flat), batch_size):
        ids = flat[s:s + batch_size]
        enc = tokenizer([texts[i] for i in ids], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor([labels[i] for i in ids])})
    return batches


def layer_kind(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", "", name).removeprefix("encoder.encoder.")


@torch.no_grad()
def collect_inputs(model: nn.Module, names: list[str], batches, max_tokens: int) -> dict[str, torch.Tensor]:
    """Inputs X [T, K] of each named linear on ``batches`` (padding tokens dropped), fp64."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mask_holder = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0]
            keep = mask_holder["mask"].reshape(-1).bool()
            store[name].append(x.reshape(-1, x.shape[-1])[keep].double())
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    for batch in batches:
        mask_holder["mask"] = batch["attention_mask"]
        model(**{k: v for k, v in batch.items() if k != "labels"})
    for h in handles:
        h.remove()
    return {n: torch.cat(v)[:max_tokens] for n, v in store.items()}


@torch.no_grad()
def embeddings(model, batches) -> torch.Tensor:
    return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).embeddings for b in batches])


@torch.no_grad()
def rel_error(X: torch.Tensor, linear: nn.Linear, layer: nn.Module) -> tuple[float, float]:
    """(||X W^T - X W_r^T||^2, ||X W^T||^2) with biases excluded; fp64."""
    W = linear.weight.double()
    Wr = layer.to_linear().weight.double() if isinstance(layer, LowRankLinear) else layer.weight.double()
    ref = X @ W.t()
    return float((X @ (W - Wr).t()).square().sum()), float(ref.square().sum())


def time_forward(models: dict[str, nn.Module], batch, repeats: int) -> dict[str, float]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    samples = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(**inputs)
        for _ in range(repeats):  # alternate so that machine load hits every model alike
            for k, m in models.items():
                t0 = time.perf_counter()
                m(**inputs)
                samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model folder (default: the bundled MiniLM)")
    parser.add_argument("--data", default=None, help="labelled text source (default: Debian fortunes)")
    parser.add_argument("--n-calib", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5, 0.3])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    encoder, tokenizer = load_encoder(args.model)
    model = ContrastiveEncoder(encoder).eval()
    texts, labels, _ = load_labeled_texts(args.data, limit=args.n_calib + args.n_eval, seed=0,
                                          min_chars=20, max_chars=400)
    calib = make_batches(tokenizer, texts[:args.n_calib], labels[:args.n_calib], 16, args.max_length)
    held = make_batches(tokenizer, texts[args.n_calib:], labels[args.n_calib:], 32, args.max_length, seed=1)
    names = find_target_linears(model, "all-linear", exclude_modules=["pooler.dense"])
    print(f"{len(names)} target layers, {len(texts)} sentences ({args.n_calib} calibration, {args.n_eval} held back)")

    stats = calibrate(model, calib, stats=METHOD_STATS, target_modules=names)
    X = collect_inputs(model, names, held, max_tokens=8192)
    dense_emb = embeddings(model, held)

    # 1. factorisations at equal rank (half of each layer's parameters)
    per_layer = []
    for name in tqdm(names, desc="factorisations"):
        linear = model.get_submodule(name)
        rank = utils.rank_at_param_fraction(linear.in_features, linear.out_features, 0.5)
        row = {"layer": name, "kind": layer_kind(name), "rank": rank}
        for method in METHODS:
            num, den = rel_error(X[name], linear, factorize(linear, rank, method=method, stats=stats[name]))
            row[method] = (num / den) ** 0.5
        per_layer.append(row)
    rows = []
    for kind in dict.fromkeys(r["kind"] for r in per_layer):
        group = [r for r in per_layer if r["kind"] == kind]
        rows.append({"layer_kind": kind, "layers": len(group), "rank": group[0]["rank"],
                     **{m: statistics.fmean(r[m] for r in group) for m in METHODS}})
    best = {m: sum(min(METHODS, key=lambda k, r=r: r[k]) == m for r in per_layer) for m in METHODS}
    rows.append({"layer_kind": "best in (layers)", "layers": len(per_layer), "rank": None, **best})
    utils.write_results(utils.RESULTS_DIR / "compress_factorizations.json", rows,
                        meta={"per_layer": per_layer, "metric": "relative output error on held-back activations"})
    print(utils.format_table(rows, ["layer_kind", "rank", *METHODS]))

    # 2. global vs uniform allocation (svd_llm)
    alloc_rows = []
    for budget in args.budgets:
        for allocation in ("uniform", "global", "global+sensitivity"):
            config = lrcomp.CompressionConfig(method="svd_llm", budget=budget, allocation=allocation.split("+")[0],
                                              sensitivity=allocation.endswith("sensitivity"),
                                              exclude_modules=["pooler.dense"])
            compressed = lrcomp.compress(copy.deepcopy(model), config, calib)
            num = den = 0.0
            for name in names:
                a, b = rel_error(X[name], model.get_submodule(name), compressed.get_submodule(name))
                num, den = num + a, den + b
            cos = (embeddings(compressed, held) * dense_emb).sum(-1)
            kept = sum(m.num_parameters() if isinstance(m, LowRankLinear) else m.weight.numel() + m.bias.numel()
                       for m in (compressed.get_submodule(n) for n in names))
            total = sum(model.get_submodule(n).weight.numel() + model.get_submodule(n).bias.numel() for n in names)
            alloc_rows.append({"budget": budget, "allocation": allocation, "kept_fraction": kept / total,
                               "dense_layers": sum(not isinstance(compressed.get_submodule(n), LowRankLinear)
                                                   for n in names),
                               "total_output_error": num / den, "cos_mean": cos.mean().item(),
                               "cos_min": cos.min().item()})
            print(alloc_rows[-1])
    utils.write_results(utils.RESULTS_DIR / "compress_allocation.json", alloc_rows,
                        meta={"method": "svd_llm", "cost": "params"})

    # 3. latency-aware allocation
    shapes = sorted({(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names})
    tokens = held[0]["input_ids"].numel()
    table = measure_latency_table(shapes, tokens=tokens, repeats=args.repeats)
    table.to_json(utils.RESULTS_DIR / "tables" / "latency_cpu.json")  # not a results table: own folder
    models = {"dense": model}
    lat_rows = []
    for cost in ("params", "latency"):
        config = lrcomp.CompressionConfig(method="svd_llm", budget=0.5, cost=cost, cost_table=table,
                                          sensitivity=True, exclude_modules=["pooler.dense"])
        compressed = lrcomp.compress(copy.deepcopy(model), config, calib)
        models[cost] = compressed
        ranks = {}
        for n in names:
            layer = compressed.get_submodule(n)
            ranks.setdefault(layer_kind(n), []).append(layer.rank if isinstance(layer, LowRankLinear) else "dense")
        cos = (embeddings(compressed, held) * dense_emb).sum(-1)
        lat_rows.append({"cost": cost, "budget": 0.5,
                         "ranks": "; ".join(f"{k.rsplit('.', 2)[-2]}.{k.rsplit('.', 1)[-1]}: "
                                            f"{'/'.join(map(str, v))}" for k, v in ranks.items()),
                         "cos_mean": cos.mean().item()})
    times = time_forward(models, held[0], args.repeats)
    for row in lat_rows:
        row.update({"t_dense_ms": times["dense"], "t_ms": times[row["cost"]],
                    "speed_ratio": times[row["cost"]] / times["dense"]})
        print(row)
    utils.write_results(utils.RESULTS_DIR / "compress_latency.json", lat_rows,
                        meta={"tokens_per_forward": tokens, "method": "svd_llm"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
