"""A user metric with its plot: HR@10 per activity bucket (head / torso / tail), per
strategy, from a saved run -- computed from ``load_run`` records only.

    python -m examples.hr_by_bucket RUN_DIR OUT.png
"""
import sys

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from simulator.metrics import BUCKETS
from simulator.results import Run, load_run
from strategies.registry import STRATEGY_COLOURS


def hr10_by_bucket(run: Run) -> pd.DataFrame:
    """Rows strategy x bucket: HR@10 averaged over every scored positive (weights ``n_pos``)."""
    d = run.devices[run.devices["n_pos"] > 0]
    g = d.assign(hits=d["hr10"] * d["n_pos"]).groupby(["strategy", "bucket"], observed=True)[["hits", "n_pos"]].sum()
    out = (g["hits"] / g["n_pos"]).rename("hr10").reset_index()
    return out[out["bucket"].isin(BUCKETS)].reset_index(drop=True)


def plot(run: Run, path: str) -> Figure:
    table = hr10_by_bucket(run)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    width = 0.8 / max(len(run.strategies), 1)
    for i, s in enumerate(run.strategies):
        rows = table[table["strategy"] == s].set_index("bucket").reindex(BUCKETS)
        ax.bar([b + i * width for b in range(len(BUCKETS))], rows["hr10"], width, label=s,
               color=STRATEGY_COLOURS.get(s, "grey"))
    ax.set_xticks([b + 0.4 - width / 2 for b in range(len(BUCKETS))], BUCKETS)
    ax.set_ylabel("HR@10")
    ax.legend(fontsize=8)
    FigureCanvasAgg(fig).print_png(path)
    return fig


if __name__ == "__main__":
    plot(load_run(sys.argv[1]), sys.argv[2])
