"""Render benchmarks/results/*.json as markdown tables into README.md.

The README section between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is
replaced (atomically); without those markers, or with ``--stdout``, the tables are printed.
Every table notes the device, torch version and commit of the run it comes from.

    python benchmarks/make_tables.py            # rewrite README.md
    python benchmarks/make_tables.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

QUALITY_COLUMNS = [  # bench_quality.py rows
    ("method", "method", ""), ("budget", "budget", ".2f"), ("seeds_str", "seeds", ""),
    (("acc_mean", "acc_std"), "accuracy (mean ± std)", ".3f"),
    (("vs_seq_mean", "vs_seq_std"), "minus best sequential, paired by seed", "+.3f"),
    ("vs_seq_p", "p (sign-flip, two-sided)", ".3f"),
    ("vs_seq_baseline", "best sequential", ""), ("params_kept_fraction", "kept params (linears)", ".3f"),
    ("lr", "lr", "g"), ("options", "options", ""), ("wall_s_mean", "wall time (s)", ".1f"),
    ("device_name", "device", ""), ("status", "status", ""), ("note", "note", "")]
# kind -> (title, [(column key, header, format)]); format "" = str(), else a format spec.
LAYOUTS = {
    "lowrank_linear_cpu": ("Low-rank linear vs dense `nn.Linear`, CPU (fp32, rank at 50% params)", [
        ("K", "K", "d"), ("N", "N", "d"), ("r", "r", "d"), ("M", "M", "d"), ("pass", "pass", ""),
        ("t_lowrank_us", "low-rank (us)", ".1f"), ("t_dense_us", "dense (us)", ".1f"),
        ("ratio", "low-rank / dense", ".3f"), ("ratio_min", "ratio of minima", ".3f"),
        ("flop_ratio", "FLOP ratio", ".3f")]),
    "lowrank_linear_gpu": ("Low-rank linear on the GPU (bf16): Triton vs eager vs torch.compile vs dense", [
        ("K", "K", "d"), ("N", "N", "d"), ("rank", "rank", ""), ("M", "M", "d"), ("pass", "pass", ""),
        ("t_triton_us", "triton (us)", ".1f"), ("t_eager_us", "eager (us)", ".1f"),
        ("t_compile_us", "compile (us)", ".1f"), ("t_dense_us", "dense (us)", ".1f"),
        ("t_roofline_us", "roofline (us)", ".1f"), ("bound", "bound", ""),
        ("triton/eager", "/eager", ".2f"), ("triton/compile", "/compile", ".2f"),
        ("triton/dense", "/dense", ".2f"), ("triton/roofline", "/roofline", ".2f")]),
    "end_to_end": ("End to end (the main job): MiniLM compressed one-shot, every encoder linear", [
        ("model", "model", ""), ("method", "method", ""), ("allocation", "allocation", ""), ("budget", "budget", ".2f"),
        ("kept_fraction", "kept params (linears)", ".3f"),
        ("params_model_after", "model params", ",d"), ("rel_err_mean", "layer err mean", ".3f"),
        ("rel_err_max", "layer err max", ".3f"), ("cos_mean", "cos mean", ".3f"), ("cos_min", "cos min", ".3f"),
        ("t_dense_ms", "dense (ms)", ".1f"), ("t_lowrank_ms", "compressed (ms)", ".1f"),
        ("speed_ratio", "time ratio", ".3f"), ("speed_ratio_min", "ratio of minima", ".3f")]),
    "quality_selection": ("Quality, phase A: every candidate (method, budget, lr, options), accuracy on a "
                          "validation split carved out of the training texts (seed 0; the mean over seeds 0-2 for "
                          "the candidates within the confirmation margin of their cell's best)", [
        ("method", "method", ""), ("budget", "budget", ".2f"), ("lr", "lr", "g"), ("options", "options", ""),
        ("seeds", "seeds", ""), ("val_acc", "val accuracy", ".3f"), ("exit", "run", ""),
        ("wall_s", "run time (s, all seeds)", ".0f"),
        ("device", "device", "")]),
    "quality": ("Quality: MiniLM fine-tuned on fortune categories, test accuracy at a budget of the encoder "
                "linears (dense FT, fine-tune -> compress -> fine-tune, joint methods; same total steps)",
                QUALITY_COLUMNS),
    "quality_ablations": ("Quality ablations: a paper's original choice against the default here (same task and "
                          "protocol)", QUALITY_COLUMNS),
    "compress_factorizations": ("One-shot factorisations at equal rank (half of each layer's parameters): relative "
                                "output error on held-back MiniLM activations, mean per layer kind", [
        ("layer_kind", "layer kind", ""), ("layers", "layers", "d"), ("rank", "rank", ""),
        ("svd", "svd", ".4g"), ("asvd", "asvd", ".4g"), ("fwsvd", "fwsvd", ".4g"), ("svd_llm", "svd_llm", ".4g"),
        ("sparsity_aware", "sparsity_aware", ".4g"), ("jactus_union", "jactus_union", ".4g")]),
    "compress_allocation": ("Global vs uniform rank allocation (svd_llm): total output error and embedding cosine", [
        ("budget", "budget", ".2f"), ("allocation", "allocation", ""), ("kept_fraction", "kept params", ".3f"),
        ("dense_layers", "layers kept dense", "d"), ("total_output_error", "total output error", ".4f"),
        ("cos_mean", "cos mean", ".4f"), ("cos_min", "cos min", ".4f")]),
    "compress_latency": ("Latency-aware vs parameter budget (svd_llm, 0.5): ranks per layer kind, measured CPU "
                         "forward", [
        ("cost", "budget counts", ""), ("budget", "budget", ".2f"), ("ranks", "ranks per layer kind", ""),
        ("cos_mean", "cos mean", ".4f"), ("t_dense_ms", "dense (ms)", ".1f"), ("t_ms", "compressed (ms)", ".1f"),
        ("speed_ratio", "time ratio", ".3f")]),
}


def _cell(value, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "–"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "–"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return format(value, fmt)
        except ValueError:
            return str(value)
    return str(value)


def _value(row: dict, key, fmt: str) -> str:
    """A cell: ``row[key]``, or for a key pair ``(mean, std)`` the text ``mean ± std``."""
    if isinstance(key, tuple):
        mean, std = row.get(key[0]), row.get(key[1])
        if mean is None:
            return "–"
        return _cell(mean, fmt) if std is None else f"{_cell(mean, fmt)} ± {_cell(std, fmt.lstrip('+'))}"
    return _cell(row.get(key), fmt)


def _generic_layout(rows: list[dict], env: dict) -> list[tuple[str, str, str]]:
    keys = [k for k in rows[0] if k not in env and isinstance(rows[0][k], (int, float, str, type(None)))]
    return [(k, k, ".4g" if isinstance(rows[0][k], float) else "") for k in keys]


def table_for(payload: dict, source: Path) -> str:
    """Markdown for one results file: heading, provenance line, table."""
    kind = payload.get("kind", source.stem)
    rows = payload.get("rows", [])
    env = payload.get("environment") or (rows[0] if rows else {})
    layout_key = kind if kind in LAYOUTS else next((k for k in LAYOUTS if kind.startswith(k)), None)
    title, columns = LAYOUTS[layout_key] if layout_key else (kind, _generic_layout(rows, env) if rows else [])
    dirty = " (uncommitted changes)" if env.get("dirty") else ""
    lines = [f"#### {title}", "",
             f"`{source.name}` · device: {env.get('device', 'unknown')} · torch {env.get('torch', '?')}"
             f" · triton {env.get('triton') or '–'} · CUDA {env.get('cuda') or '–'}"
             f" · commit `{env.get('commit', 'unknown')}`{dirty} · {payload.get('created', '')}", ""]
    if not rows:
        return "\n".join(lines + ["(no rows)", ""])
    lines.append("| " + " | ".join(h for _, h, _ in columns) + " |")
    lines.append("|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_value(row, k, fmt) for k, _, fmt in columns) + " |")
    return "\n".join(lines + [""])


def render(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return "_No results yet: run the scripts in benchmarks/._\n"
    parts = []
    for path in files:
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            print(f"skipping {path}: {err}", file=sys.stderr)
            continue
        if isinstance(payload, list):  # tolerate a bare list of rows
            payload = {"rows": payload}
        parts.append(table_for(payload, path))
    return "\n".join(parts)


def splice(readme: str, tables: str) -> str | None:
    """``readme`` with the marked section replaced by ``tables``; None if the markers are missing."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < 0 or end < start:
        return None
    return readme[: start + len(BEGIN)] + "\n" + tables.rstrip("\n") + "\n" + readme[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("--stdout", action="store_true", help="print the tables, leave README.md alone")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the results")
    args = parser.parse_args(argv)
    tables = render(args.results)
    readme = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else None
    updated = splice(readme, tables) if readme is not None else None
    if args.stdout or updated is None:
        if updated is None and not args.stdout:
            print(f"note: {args.readme} has no {BEGIN} ... {END} markers; printing the tables\n", file=sys.stderr)
        print(tables)
        return 0
    if args.check:
        if updated != readme:
            print(f"{args.readme} is out of date: run python benchmarks/make_tables.py", file=sys.stderr)
            return 1
        return 0
    if updated != readme:
        fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=args.readme.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(updated)
        os.chmod(tmp, args.readme.stat().st_mode & 0o777)  # mkstemp makes 0600 files
        os.replace(tmp, args.readme)
        print(f"updated {args.readme}")
    else:
        print(f"{args.readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
