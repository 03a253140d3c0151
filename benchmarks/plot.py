"""Draw one PNG per benchmark CSV: median time per provider across cases (latest run only).

    python benchmarks/plot.py [benchmarks/results/NAME.csv ...]

``e2e.csv`` (``tokprune bench e2e``) is drawn as lines instead: decode tokens/s against context, one
panel per batch size, one line per provider (and prefill tokens/s against prompt length).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.runner import RESULTS_DIR


def plot_csv(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows")
    latest = max(r["date"][:16] for r in rows)  # rows of the last run (same minute)
    rows = [r for r in rows if r["date"][:16] == latest]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    series = defaultdict(dict)
    for r in rows:
        series[r["provider"]][r["case"]] = float(r["median_ms"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    width = 0.8 / max(1, len(series))
    for i, (provider, values) in enumerate(series.items()):
        xs = [c + i * width for c in range(len(cases))]
        ax.bar(xs, [values.get(c, 0.0) for c in cases], width, label=provider)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, rotation=20)
    ax.set_ylabel("median time (ms)")
    ax.set_title(f"{path.stem} — {rows[0]['device']} — {latest}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_e2e(path: Path, date: str = None) -> Path:
    """Line plot of an ``e2e.csv``: tokens/s against context per provider, one panel per batch size and
    one for prefill. ``date``: the run to draw (default: the latest). Returns the PNG path."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows")
    date = date or max(r["date"] for r in rows)
    rows = [r for r in rows if r["date"] == date]
    panels = defaultdict(lambda: defaultdict(list))  # panel -> provider -> [(x, tokens/s)]
    for r in rows:
        params, metrics = json.loads(r["params"]), json.loads(r["metrics"])
        if params.get("kind") == "decode":
            key, x = f"decode, batch {params['batch']}", params["context"]
        else:
            key, x = "prefill", params.get("tokens")
        panels[key][r["provider"]].append((x, float(metrics["tokens_per_s"])))
    keys = sorted(panels, key=lambda k: (k == "prefill", k))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for provider, points in panels[key].items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)" if key != "prefill" else "prompt (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tokprune bench e2e — {rows[0]['device']} — {date}", fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or sorted(RESULTS_DIR.glob("*.csv"))
    for path in paths:
        print(plot_e2e(path) if path.stem == "e2e" else plot_csv(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
