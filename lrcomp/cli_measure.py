"""``lrcomp eval``, ``lrcomp bench`` and ``lrcomp report``: measuring a saved model (perplexity, embedding
cosine, lm-eval tasks), timing it against a reference, and plotting a quality results file.

The parser, the shared loading helpers and the exit codes live in :mod:`lrcomp.cli`, which imports this
module only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrcomp.cli import (
    EXIT_OK,
    CLIError,
    InputNotFound,
    UsageError,
    _architectures,
    _auto_class,
    _deployed_params,
    _device,
    _is_causal_model,
    _load_model,
    _load_texts,
    _load_tokenizer,
    _lowrank_layers,
    _max_positions,
    _model_dir,
    _one_line,
    _transformers,
    _write_json,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _input_file(path: str, argname: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputNotFound(f"{argname} {path!r} does not exist or is not a file")
    return file


# ---------------------------------------------------------------------------------------------- eval
@torch.inference_mode()
def perplexity(model: nn.Module, input_ids: Tensor, window: int, batch_size: int = 1,
               progress: bool = True) -> dict:
    """Perplexity of a causal LM on one token stream, in non-overlapping windows.

    Args:
        model: a causal LM: ``model(input_ids=[B, W]).logits`` is ``[B, W, V]``.
        input_ids: ``[n]`` token ids, the whole text tokenized once.
        window: tokens per window W; the ``n // W`` full windows are scored, the tail (``n mod W``
            tokens) is dropped; each window is scored on its own (no context from the previous one).
        batch_size: windows per forward.

    Returns:
        ``{"windows", "tokens", "predicted_tokens", "dropped_tokens", "nll_mean", "perplexity"}``:
        ``nll_mean`` is the mean over all predicted tokens (``windows * (W - 1)``: every token of a window
        but its first) of ``-log p(token | the window's tokens before it)``, summed in fp64;
        ``perplexity = exp(nll_mean)``.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [n], got {list(input_ids.shape)}")
    if window < 2:
        raise ValueError(f"window must be >= 2 (one context token, one predicted), got {window}")
    n_windows = input_ids.numel() // window
    if n_windows == 0:
        raise ValueError(f"the text has {input_ids.numel()} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    windows = input_ids[: n_windows * window].view(n_windows, window)
    total = torch.zeros((), dtype=torch.float64)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", disable=not progress,
                      file=sys.stderr):
        batch = windows[start:start + batch_size].to(device)  # [b, W]
        logits = model(input_ids=batch, use_cache=False).logits  # [b, W, V]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += nll.double().cpu()
    predicted = n_windows * (window - 1)
    nll_mean = float(total) / predicted
    return {"windows": n_windows, "tokens": int(input_ids.numel()), "predicted_tokens": predicted,
            "dropped_tokens": int(input_ids.numel() - n_windows * window), "nll_mean": nll_mean,
            "perplexity": math.exp(nll_mean)}


def _embed_all(model: nn.Module, tokenizer, texts: list[str], batch_size: int, max_length: int, desc: str) -> Tensor:
    """:func:`lrcomp.models.embed` in chunks under a progress bar: ``[n, hidden]`` fp32 on the CPU, unit rows."""
    from tqdm.auto import tqdm

    from lrcomp.models import embed

    chunk = batch_size * 4
    out = [embed(model, tokenizer, texts[i:i + chunk], batch_size=batch_size, max_length=max_length).cpu()
           for i in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", file=sys.stderr)]
    return torch.cat(out)


def _compare(args: argparse.Namespace, folder: Path, device: torch.device) -> dict:
    """Mean-pooled embedding cosine of DIR vs ``--compare`` REF_DIR on ``--data`` texts."""
    reference = _model_dir(args.compare, "--compare")
    texts = _load_texts(args.data, args.limit, args.seed)
    transformers = _transformers()
    cls = transformers.AutoModel if args.auto_class is None else _auto_class(args.auto_class, folder)
    embeddings = []
    for path, what in ((folder, "DIR"), (reference, "REF_DIR")):
        model = _load_model(path, cls, args.dtype, device)
        tokenizer = _load_tokenizer(path, required=False, pad=True) or _load_tokenizer(
            reference if path == folder else folder, pad=True)
        base = getattr(model, "base_model", model)  # a model with a head: its base gives last_hidden_state
        try:
            embeddings.append(_embed_all(base, tokenizer, texts, args.batch_size, args.max_length, f"embed {what}"))
        except AttributeError as err:
            raise CLIError(f"--compare needs models that return last_hidden_state ({type(model).__name__}: "
                           f"{_one_line(err)})") from err
        del model
    a, b = embeddings  # [n, H] each, unit rows
    if a.shape != b.shape:
        raise CLIError(f"DIR and --compare give embeddings of different shapes {list(a.shape)} and {list(b.shape)}")
    cos = (a.double() * b.double()).sum(-1)  # [n]
    return {"reference": str(reference), "data": args.data if args.data is not None else "fortunes (Debian)",
            "texts": len(texts), "max_length": args.max_length, "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()), "cos_std": float(cos.std()) if len(texts) > 1 else 0.0}


def _lm_eval(args: argparse.Namespace, model: nn.Module, tokenizer) -> dict:
    """Run ``--tasks`` through lm-eval's HFLM wrapper on the loaded model: lm-eval's ``results`` dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size,
              max_length=_max_positions(model))
    output = simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.task_limit)
    return (output or {}).get("results", {})


def cmd_eval(args: argparse.Namespace) -> int:
    """``lrcomp eval``: perplexity (``--ppl``), embedding cosine to a reference (``--compare``), lm-eval tasks."""
    if args.ppl is None and args.compare is None and args.tasks is None:
        raise UsageError("nothing to evaluate: give --ppl TEXTFILE, --compare REF_DIR and/or --tasks T1,T2")
    if args.tasks is not None and importlib.util.find_spec("lm_eval") is None:
        raise CLIError("--tasks runs lm-eval, which is not installed: pip install lm-eval")
    folder = _model_dir(args.dir, "DIR")
    text_file = _input_file(args.ppl, "--ppl") if args.ppl is not None else None
    if args.compare is not None:
        _model_dir(args.compare, "--compare")
    device = _device(args.device)
    results: dict = {"model": str(folder)}

    if text_file is not None or args.tasks is not None:
        auto_class = _auto_class(args.auto_class, folder)
        model = _load_model(folder, auto_class, args.dtype, device)
        tokenizer = _load_tokenizer(folder)
        results["architecture"] = type(model).__name__
        if text_file is not None:
            if not _is_causal_model(model):
                raise UsageError(f"--ppl needs a causal LM; DIR loads as {type(model).__name__} (config "
                                 f"architectures: {_architectures(folder)}; choose the class with --auto-class)")
            limit = _max_positions(model)
            if limit is not None and args.window > limit:
                raise UsageError(f"--window {args.window} is longer than the model's {limit} positions")
            text = text_file.read_text(encoding="utf-8")
            input_ids = torch.as_tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # [n]
            if input_ids.numel() < args.window:
                raise CLIError(f"--ppl {args.ppl!r} has {input_ids.numel()} tokens, fewer than one window of "
                               f"--window {args.window}: use a longer text or a smaller window")
            ppl = perplexity(model, input_ids, args.window, args.ppl_batch_size)
            results["ppl"] = {"file": str(text_file), "window": args.window, **ppl}
            print(f"perplexity {ppl['perplexity']:.4f} (mean NLL {ppl['nll_mean']:.5f} over "
                  f"{ppl['predicted_tokens']:,} predicted tokens in {ppl['windows']} windows of {args.window}; "
                  f"{ppl['dropped_tokens']} tail tokens dropped)")
        if args.tasks is not None:
            results["tasks"] = _lm_eval(args, model, tokenizer)
            for task, metrics in results["tasks"].items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                print(f"{task}: {shown}")
        del model
    if args.compare is not None:
        results["compare"] = _compare(args, folder, device)
        c = results["compare"]
        print(f"embedding cosine vs {c['reference']}: mean {c['cos_mean']:.6f}, min {c['cos_min']:.6f} "
              f"({c['texts']} texts)")
    if args.json is not None:
        _write_json(args.json, results)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- bench
@torch.inference_mode()
def _time_forward(model: nn.Module, inputs: dict, device: torch.device) -> float:
    """Seconds of one forward of ``model(**inputs)`` (inputs ``[B, T]`` tensors), synchronised on CUDA."""
    _sync(device)
    start = time.perf_counter()
    model(**inputs)
    _sync(device)
    return time.perf_counter() - start


def cmd_bench(args: argparse.Namespace) -> int:
    """``lrcomp bench``: parameters and median forward time of DIR vs ``--reference``, interleaved runs."""
    from tqdm.auto import tqdm

    folder = _model_dir(args.dir, "DIR")
    reference = _model_dir(args.reference, "--reference")
    device = _device(args.device)
    models = {}
    for name, path in (("compressed", folder), ("reference", reference)):
        models[name] = _load_model(path, _auto_class(args.auto_class, path), args.dtype, device)
    vocab = min(int(getattr(m.config, "vocab_size", 0) or 0) for m in models.values())
    if vocab < 1:
        raise CLIError("the models' configs hold no vocab_size: cannot build token inputs")
    for name, model in models.items():
        limit = _max_positions(model)
        if limit is not None and args.seq_len > limit:
            raise UsageError(f"--seq-len {args.seq_len} is longer than the {name} model's {limit} positions")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)  # [B, T]
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    for model in models.values():
        for _ in range(args.warmup):
            _time_forward(model, inputs, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in tqdm(range(args.repeats), desc="bench", unit="round", file=sys.stderr):
        for name, model in models.items():  # interleaved: a load change on a shared machine hits both
            times[name].append(_time_forward(model, inputs, device))
    rows = []
    ref_params = _deployed_params(models["reference"])
    ref_ms = statistics.median(times["reference"]) * 1e3
    for name, path in (("compressed", folder), ("reference", reference)):
        model = models[name]
        params = _deployed_params(model)
        ms = statistics.median(times[name]) * 1e3
        rows.append({"model": name, "path": str(path), "architecture": type(model).__name__,
                     "lowrank_layers": len(_lowrank_layers(model)), "params": params,
                     "params_fraction": params / ref_params, "median_ms": ms,
                     "min_ms": min(times[name]) * 1e3, "time_ratio": ms / ref_ms})
    header = ("model", "low-rank layers", "params", "params vs ref", "median ms", "min ms", "time vs ref")
    cells = [header] + [(r["model"], str(r["lowrank_layers"]), f"{r['params']:,}", f"{r['params_fraction']:.3f}",
                         f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['time_ratio']:.3f}") for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"forward of [{args.batch_size}, {args.seq_len}] tokens on {device}, median of {args.repeats} "
          f"(after {args.warmup} warm-up), {torch.get_num_threads()} CPU threads")
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths,
                                                                                              strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if args.json is not None:
        _write_json(args.json, {"device": str(device), "batch_size": args.batch_size, "seq_len": args.seq_len,
                                "repeats": args.repeats, "warmup": args.warmup,
                                "cpu_threads": torch.get_num_threads(), "rows": rows})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- report
def _quality_rows(path: Path) -> list[dict]:
    """The plottable rows of a quality results file (``{"rows": [...]}`` or a bare list)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CLIError(f"RESULTS_JSON {str(path)!r} is not valid JSON: {err}") from err
    rows = payload.get("rows") if isinstance(payload, dict) else payload
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise CLIError(f"RESULTS_JSON {str(path)!r}: expected {{\"rows\": [...]}} or a list of row objects")
    need = ("method", "params_kept_fraction", "acc_mean")
    usable = [r for r in rows if r.get("status", "ok") == "ok" and r.get("acc_mean") is not None
              and r.get("method") is not None
              and (r.get("params_kept_fraction") is not None or r.get("budget") is None)]
    if not usable:
        raise CLIError(f"RESULTS_JSON {str(path)!r} has no rows with {', '.join(need)} (and status ok): not a "
                       f"benchmarks/results/quality*.json file?")
    return usable


def cmd_report(args: argparse.Namespace) -> int:
    """``lrcomp report``: accuracy vs kept fraction of the targeted parameters, one line per method."""
    path = _input_file(args.results, "RESULTS_JSON")
    rows = _quality_rows(path)
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise CLIError("report needs matplotlib: pip install matplotlib") from err

    from lrcomp.atomic import atomic_path
    from lrcomp.plots import quality_figure

    fig = quality_figure(rows, args.title or path.name)
    dense = sum(r.get("budget") is None for r in rows)
    methods = {r["method"] for r in rows if r.get("budget") is not None}
    out = Path(args.out).expanduser()
    try:
        with atomic_path(out) as tmp:  # a temporary file in the same folder, then os.replace
            fig.savefig(tmp, dpi=args.dpi, format="png")
    finally:
        plt.close(fig)
    print(f"{len(methods)} methods, {len(rows)} rows ({dense} dense) -> {out}")
    return EXIT_OK


