"""Human-readable evaluation outputs: `report.md` (markdown tables) and `metrics.png` (bar charts).

`write_report(results, timings, out_dir)` takes the metrics.json object (`{protocol: {...}}`, see
`llmrec.eval.evaluate`) and `{protocol: {model: {fit_s, score_s, users_per_s}}}`. report.md holds, per
protocol, a line saying what the protocol is, a models x metrics table, the same table for cold-item targets
(for "cold", where every target is cold, a line saying so instead), and fit/score times; metrics.png
has one row of bar charts per protocol (Recall@10, NDCG@10, MRR per model), drawn with the Agg backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["markdown_report", "plot_metrics", "write_report"]

PLOT_METRICS = ("recall@10", "ndcg@10", "mrr")
PROTOCOL_TEXT = {
    "loo": "Leave-last-out: each user's last event is the target",
    "time": "Global time cutoff: each test user's first event after it is the target (all of them with "
    "--time-targets all)",
    "cold": "Held-out items: a random share of the items left out of training with all their events; every "
    "target is one of them",
}


def write_report(
    results: dict[str, Any],
    timings: dict[str, dict[str, dict[str, float]]],
    out_dir: str | os.PathLike,
    skipped: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/report.md and out_dir/metrics.png; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(markdown_report(results, timings, skipped))
    png = plot_metrics(results, out / "metrics.png")
    logger.info("wrote %s and %s", md, png)
    return md, png


def markdown_report(
    results: dict[str, Any],
    timings: dict[str, dict[str, dict[str, float]]],
    skipped: dict[str, str] | None = None,
) -> str:
    """The report.md text: per protocol, all-targets table, cold-item table, timing table."""
    lines = ["# Evaluation report", ""]
    for proto, res in results.items():
        lines += [
            f"## Protocol `{proto}` on `{res['dataset']}`",
            "",
            (f"{PROTOCOL_TEXT[proto]}. " if proto in PROTOCOL_TEXT else "")
            + f"{res['n_users']} test users, full ranking over {res['n_items']} items "
            "(each user's history items excluded"
            + (
                f"; {res['repeat_targets_removed']} test targets that repeat a history item removed"
                if res.get("repeat_targets_removed")
                else ""
            )
            + ").",
            "",
        ]
        lines += _table(res["models"])
        if res.get("ci95"):
            diff = res.get("diff_vs_llmrec_ci95") or {}
            lines += ["", "NDCG@10 with its 95% bootstrap interval over test users"
                      + (" and the paired interval of (model - llmrec)" if diff else "") + ":", "",
                      "| model | NDCG@10 | 95% interval |" + (" model - llmrec, 95% |" if diff else ""),
                      "|---|---:|---:|" + ("---:|" if diff else "")]
            for m, (lo, hi) in res["ci95"].items():
                d = diff.get(m)
                lines.append(f"| {m} | {res['models'][m]['ndcg@10']:.4f} | [{lo:.4f}, {hi:.4f}] |"
                             + ((f" [{d[0]:+.4f}, {d[1]:+.4f}] |" if d else " |") if diff else ""))
        cold = res["cold_items"]
        lines += ["", f"### Cold items ({cold['n_events']} test targets never seen in training)", ""]
        if proto == "cold":  # every target is cold: the table would repeat the one above
            lines.append("(every test target is a held-out item: the table above is the cold-item table)")
        else:
            lines += _table(cold["models"]) if cold["models"] else ["(no cold-item targets in this split)"]
        t = timings.get(proto, {})
        if t:
            lines += ["", "### Time", "", "| model | fit (s) | score (s) | users/s |", "|---|---:|---:|---:|"]
            lines += [
                f"| {m} | {v['fit_s']:.1f} | {v['score_s']:.1f} | {v['users_per_s']:.0f} |"
                for m, v in t.items()
            ]
        lines.append("")
    if skipped:
        lines += ["## Skipped models", ""] + [f"- `{m}`: {why}" for m, why in skipped.items()] + [""]
    return "\n".join(lines)


def plot_metrics(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bar charts (one row per protocol, one panel per metric in PLOT_METRICS) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = list(results)
    fig, axes = plt.subplots(
        len(protos), len(PLOT_METRICS), figsize=(4 * len(PLOT_METRICS), 3.2 * len(protos)), squeeze=False
    )
    for r, proto in enumerate(protos):
        models = results[proto]["models"]
        names = list(models)
        for c, metric in enumerate(PLOT_METRICS):
            ax = axes[r][c]
            vals = [models[m][metric] for m in names]
            ax.bar(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{proto}: {metric}", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def _table(models: dict[str, dict[str, float]]) -> list[str]:
    if not models:
        return ["(no models)"]
    keys = list(next(iter(models.values())))
    rows = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    best = {k: max(m[k] for m in models.values()) for k in keys}
    for name, m in models.items():
        cells = [f"**{m[k]:.4f}**" if m[k] == best[k] and len(models) > 1 else f"{m[k]:.4f}" for k in keys]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows
