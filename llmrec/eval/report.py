"""Human-readable evaluation outputs: `report.md` (markdown tables) and `metrics.png` (bar charts).

`write_report(results, timings, out_dir)` takes the metrics.json object (`{protocol: {...}}`, see
`llmrec.eval.evaluate`) and `{protocol: {model: {fit_s, score_s, users_per_s}}}`. report.md holds, per
protocol, a line saying what the protocol is, a models x metrics table, NDCG@10 with its 95% interval and the
paired interval to llmrec, mean +- sd over the seeds, the same two tables for cold-item targets (for
"cold", where every target is cold, a line saying so instead), NDCG@10 on the users whose target has a unique
timestamp, the setting tuning chose per model, and fit/score times; then the protocols skipped and why.
metrics.png has one row of bar charts per protocol (Recall@10, NDCG@10, MRR per model), drawn with the Agg
backend.
`results_table(results)` is the short plain-text table the CLI prints at the end.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["markdown_report", "plot_metrics", "results_table", "write_report"]

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
    skipped_protocols: dict[str, str] | None = None,
    item_text: dict[str, dict[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/report.md and out_dir/metrics.png; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(markdown_report(results, timings, skipped_protocols, item_text))
    png = plot_metrics(results, out / "metrics.png")
    logger.info("wrote %s and %s", md, png)
    return md, png


def markdown_report(
    results: dict[str, Any],
    timings: dict[str, dict[str, dict[str, float]]],
    skipped_protocols: dict[str, str] | None = None,
    item_text: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The report.md text: per protocol, all-targets table, intervals, seeds, cold-item table,
    unique-timestamp subset, tuning, timing table."""
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
            + ")."
            + _item_text_line((item_text or {}).get(proto)),
            "",
        ]
        lines += _table(res["models"])
        lines += _interval_table(res, "test users")
        lines += _seeds_table(res.get("seeds"))
        cold = res["cold_items"]
        lines += ["", f"### Cold items ({cold['n_events']} test targets never seen in training)", ""]
        if proto == "cold":  # every target is cold: the table would repeat the one above
            lines.append("(every test target is a held-out item: the table above is the cold-item table)")
        else:
            lines += _table(cold["models"]) if cold["models"] else ["(no cold-item targets in this split)"]
            lines += _interval_table(cold, "the users with a cold target")
        lines += _unique_ts_table(res)
        lines += _tuning_table(res.get("tuning"))
        t = timings.get(proto, {})
        if t:
            lines += ["", "### Time", "", "| model | fit (s) | score (s) | users/s |", "|---|---:|---:|---:|"]
            lines += [
                f"| {m} | {v['fit_s']:.1f} | {v['score_s']:.1f} | {v['users_per_s']:.0f} |"
                for m, v in t.items()
            ]
        lines.append("")
    if skipped_protocols:
        lines += ["## Skipped protocols", ""]
        lines += [f"- `{p}`: {why}" for p, why in skipped_protocols.items()] + [""]
    return "\n".join(lines)


def results_table(results: dict[str, Any]) -> str:
    """Plain-text NDCG@10 / Recall@10 table per protocol, with the 95% interval and the paired difference to
    llmrec (what `llmrec evaluate` and `llmrec pipeline` print at the end)."""
    lines = []
    for proto, res in results.items():
        lines.append(f"{proto}: {res['n_users']} test users x {res['n_items']} items on {res['dataset']} "
                     f"(NDCG@10 95% interval; model - llmrec, paired 95% interval)")
        diff = res.get("diff_vs_llmrec_ci95") or {}
        sd = (res.get("seeds") or {}).get("models", {})
        for name, m in sorted(res["models"].items(), key=lambda kv: -kv[1]["ndcg@10"]):
            lo, hi = (res.get("ci95") or {}).get(name, (float("nan"), float("nan")))
            d = diff.get(name)
            s = (sd.get(name) or {}).get("ndcg@10", {}).get("sd")
            lines.append(
                f"  {name:<20} ndcg@10 {m['ndcg@10']:.4f} [{lo:.4f}, {hi:.4f}]"
                + (f" sd {s:.4f}" if s is not None else "")
                + f"  recall@10 {m['recall@10']:.4f}"
                + (f"  vs llmrec [{d[0]:+.4f}, {d[1]:+.4f}]" if d else "")
            )
    return "\n".join(lines)


def _item_text_line(info: dict[str, Any] | None) -> str:
    if not info:
        return ""
    return (f" Item text from user-written texts before the cutoff: {info['n_visible']} of "
            f"{info['n_text_events']} texts, {info['n_items_changed']} items re-embedded.")


def _interval_table(res: dict[str, Any], over: str) -> list[str]:
    """NDCG@10 per model with its 95% bootstrap interval over `over` and, with llmrec, the paired interval of
    (model - llmrec); nothing when `res` has no intervals."""
    if not res.get("ci95"):
        return []
    diff = res.get("diff_vs_llmrec_ci95") or {}
    lines = ["", f"NDCG@10 with its 95% bootstrap interval over {over}"
             + (" and the paired interval of (model - llmrec)" if diff else "") + ":", "",
             "| model | NDCG@10 | 95% interval |" + (" model - llmrec, 95% |" if diff else ""),
             "|---|---:|---:|" + ("---:|" if diff else "")]
    for m, (lo, hi) in res["ci95"].items():
        d = diff.get(m)
        lines.append(f"| {m} | {res['models'][m]['ndcg@10']:.4f} | [{lo:.4f}, {hi:.4f}] |"
                     + ((f" [{d[0]:+.4f}, {d[1]:+.4f}] |" if d else " |") if diff else ""))
    return lines


def _seeds_table(seeds: dict[str, Any] | None) -> list[str]:
    if not seeds or len(seeds.get("seeds", [])) < 2:
        return []
    lines = ["", f"Mean +- sd over {len(seeds['seeds'])} training seeds {seeds['seeds']}:", "",
             "| model | NDCG@10 | Recall@10 | MRR |", "|---|---:|---:|---:|"]
    for name, m in seeds["models"].items():
        cells = [f"{m[k]['mean']:.4f} +- {m[k]['sd']:.4f}" for k in ("ndcg@10", "recall@10", "mrr")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _unique_ts_table(res: dict[str, Any]) -> list[str]:
    u = res.get("unique_ts")
    if not u:
        return []
    lines = ["", f"### Users whose target has a unique timestamp ({u['n_users']} of {res['n_users']})", ""]
    if not u["models"]:
        return lines + ["(every test target shares its timestamp with another event of the user)"]
    lines += ["| model | NDCG@10 | Recall@10 |", "|---|---:|---:|"]
    lines += [f"| {n} | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} |" for n, m in u["models"].items()]
    return lines


def _tuning_table(tuning: dict[str, Any] | None) -> list[str]:
    if not tuning:
        return []
    lines = ["", "### Tuning (chosen on validation)", "", "| model | configs | chosen | val NDCG@10 |",
             "|---|---:|---|---:|"]
    for name, t in tuning.items():
        chosen = t.get("best", {k: t[k] for k in ("base", "weight", "best_epoch", "rerank", "cooc_weight")
                                if k in t and t[k] is not None})
        val = t.get("val_ndcg@10")
        lines.append(f"| {name} | {t.get('n_configs', '')} | {chosen} | "
                     + (f"{val:.4f}" if isinstance(val, float) else "") + " |")
    return lines


def plot_metrics(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bar charts (one row per protocol, one panel per metric in PLOT_METRICS) saved as PNG."""
    from llmrec.optional import require

    matplotlib = require("matplotlib", "the evaluation plot (metrics.png)")
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
