"""Figures of lrcomp's results (matplotlib, imported on use; the Agg backend, no display needed)."""

from __future__ import annotations


def quality_figure(rows: list[dict], title: str = ""):
    """Accuracy against the kept fraction of the targeted parameters: one line per method, dense as a band.

    ``rows``: the rows of a quality results file (``benchmarks/results/quality*.json``), each with
    ``method``, ``budget`` (None for dense), ``params_kept_fraction``, ``acc_mean``, ``acc_std`` and an
    optional ``status`` (rows whose status is not "ok" are left out). When rows carry ``vs_seq_mean`` /
    ``vs_seq_std`` (accuracy minus the best sequential baseline's, paired by seed), a second panel shows
    them per budget around a zero line: above it a method beats that baseline. Returns the matplotlib
    Figure; the caller saves and closes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("acc_mean") is not None]
    floor = _axis_floor([r["acc_mean"] for r in ok])
    paired = [r for r in ok if r.get("vs_seq_mean") is not None]
    if paired:
        fig, (ax, ax_paired) = plt.subplots(2, 1, figsize=(8.5, 8.0), height_ratios=(1.4, 1.0))
    else:
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for r in (r for r in ok if r.get("budget") is None):
        ax.axhline(r["acc_mean"], color="black", lw=1.2, label=f"{r['method']} ({r['acc_mean']:.3f})")
        if r.get("acc_std"):
            ax.axhspan(r["acc_mean"] - r["acc_std"], r["acc_mean"] + r["acc_std"], color="black", alpha=0.08)
    markers = "osD^vP*Xh<>"
    methods = list(dict.fromkeys(r["method"] for r in ok if r.get("budget") is not None))
    colors = {}  # method -> its line's color, for the second panel
    for i, m in enumerate(methods):
        pts = sorted((r for r in ok if r["method"] == m and r.get("budget") is not None),
                     key=lambda r: r["params_kept_fraction"])
        line = ax.errorbar([r["params_kept_fraction"] for r in pts], [r["acc_mean"] for r in pts],
                           yerr=[r.get("acc_std") or 0.0 for r in pts], marker=markers[i % len(markers)], capsize=3,
                           label=m)
        colors[m] = line[0].get_color()
        for r in pts:  # far below the rest: drawn at the bottom edge with its value
            if floor is not None and r["acc_mean"] < floor:
                x = r["params_kept_fraction"]
                ax.plot([x], [floor], marker="v", ms=9, color=line[0].get_color(), clip_on=False)
                ax.annotate(f"{m}: {r['acc_mean']:.3f}", (x, floor), textcoords="offset points", xytext=(-8, 4),
                            ha="right", fontsize=7, color=line[0].get_color())
    ax.set_xlabel("kept fraction of the targeted linear weights")
    ax.set_ylabel("accuracy")
    kept = [r["params_kept_fraction"] for r in ok if r.get("budget") is not None]
    ax.set_xlim(max(0.0, min(kept, default=0.0) - 0.1), 1.05)
    if floor is not None:
        ax.set_ylim(bottom=floor)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(title, fontsize=9)
    if paired:
        _paired_panel(ax_paired, paired, colors)
    fig.tight_layout()
    return fig


def _paired_panel(ax, rows: list[dict], colors: dict[str, str]) -> None:
    """Per budget, each method's accuracy minus the best sequential baseline's (mean ± std over seeds)."""
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        pts = [r for r in rows if r["method"] == m]
        xs = [budgets.index(r["budget"]) - 0.4 + width * (i + 0.5) for r in pts]
        ax.errorbar(xs, [r["vs_seq_mean"] for r in pts], yerr=[r.get("vs_seq_std") or 0.0 for r in pts],
                    fmt="o", capsize=3, color=colors.get(m), label=m)
    ax.axhline(0.0, color="black", lw=1.0)
    ax.set_xticks(range(len(budgets)), [f"budget {b:g}" for b in budgets])
    ax.set_ylabel("accuracy minus best sequential\n(paired by seed)")
    ax.grid(alpha=0.3, axis="y")


def _axis_floor(values: list[float], gap: float = 0.15) -> float | None:
    """Lower y limit that leaves out values more than ``gap`` below the median (None: nothing to leave out).

    A collapsed run (e.g. a method at chance) would otherwise squeeze every other line into a thin band;
    the figure marks such points at the bottom edge with their value instead.
    """
    if len(values) < 3:
        return None
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    kept = [v for v in ordered if v >= median - gap]
    if len(kept) == len(ordered):
        return None
    return max(0.0, kept[0] - 0.03)
