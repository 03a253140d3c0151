"""Draw one PNG per benchmark CSV: median time per provider across cases (latest run only).

    python benchmarks/plot.py [benchmarks/results/NAME.csv ...]
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


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or sorted(RESULTS_DIR.glob("*.csv"))
    for path in paths:
        print(plot_csv(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
