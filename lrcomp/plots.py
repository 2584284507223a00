"""Figures of lrcomp's results (matplotlib, imported on use; the Agg backend, no display needed)."""

from __future__ import annotations


def quality_figure(rows: list[dict], title: str = ""):
    """Accuracy against the kept fraction of the targeted parameters: one line per method, dense as a band.

    ``rows``: the rows of a quality results file (``benchmarks/results/quality*.json``), each with
    ``method``, ``budget`` (None for dense), ``params_kept_fraction``, ``acc_mean``, ``acc_std`` and an
    optional ``status`` (rows whose status is not "ok" are left out). Returns the matplotlib Figure;
    the caller saves and closes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("acc_mean") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in (r for r in ok if r.get("budget") is None):
        ax.axhline(r["acc_mean"], color="black", lw=1.2, label=f"{r['method']} ({r['acc_mean']:.3f})")
        if r.get("acc_std"):
            ax.axhspan(r["acc_mean"] - r["acc_std"], r["acc_mean"] + r["acc_std"], color="black", alpha=0.08)
    markers = "osD^vP*Xh<>"
    methods = list(dict.fromkeys(r["method"] for r in ok if r.get("budget") is not None))
    for i, m in enumerate(methods):
        pts = sorted((r for r in ok if r["method"] == m and r.get("budget") is not None),
                     key=lambda r: r["params_kept_fraction"])
        ax.errorbar([r["params_kept_fraction"] for r in pts], [r["acc_mean"] for r in pts],
                    yerr=[r.get("acc_std") or 0.0 for r in pts], marker=markers[i % len(markers)], capsize=3,
                    label=m)
    ax.set_xlabel("kept fraction of the targeted linear weights")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
