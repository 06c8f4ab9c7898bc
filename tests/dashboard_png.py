"""Draw the Grafana dashboard's panels from real Prometheus query results into a PNG (docs/dashboard.png).

No Grafana server runs on these machines, so tests/e2e/test_observability.py evaluates every panel's
queries of the checked-in dashboard JSON against its Prometheus and hands the answers here. The layout
(24-column grid, rows, panel kinds, units, legends) is read from that same JSON; values are the query
results exactly as Prometheus returned them (``query_range`` matrices). It is a picture of the
dashboard, not Grafana: colours and fonts only approximate it.

    python -m tests.dashboard_png RESULTS.json OUT.png    # RESULTS.json as saved by the e2e test
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

__all__ = ["draw_dashboard", "legend_of", "main"]

BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLORS = ("#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a", "#96d98d")
ROW_UNITS = 30  # pixels per grid unit of height, as Grafana's 30 px rows


def legend_of(fmt: str, metric: Mapping[str, str]) -> str:
    """Grafana's legend format: ``{{label}}`` replaced by the series' label value."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()
    return text or ",".join(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__") or "value"


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value:.0%}"
    if unit == "s":
        if abs(value) >= 3600:
            return f"{value / 3600:.1f} h"
        if abs(value) >= 60:
            return f"{value / 60:.1f} min"
        return f"{value:.2g} s" if abs(value) < 1 else f"{value:.1f} s"
    if unit == "Bps":
        for scale, name in ((1 << 20, "MiB/s"), (1 << 10, "KiB/s")):
            if abs(value) >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B/s"
    if unit in ("ops", "reqps"):
        return f"{value:.2g}/s"
    return f"{value:.3g}"


def _series(result: Sequence[Mapping[str, Any]], fmt: str) -> list[tuple[str, list[float], list[float]]]:
    out = []
    for s in result:
        ts = [float(t) for t, _ in s["values"]]
        vs = [float(v) for _, v in s["values"]]
        out.append((legend_of(fmt, s["metric"]), ts, vs))
    return out


def _style(ax: Axes, title: str) -> None:
    ax.set_facecolor(PANEL)
    ax.set_title(title, color=TEXT, fontsize=9, loc="left", pad=4)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.tick_params(colors=TEXT, labelsize=6)
    ax.grid(color=GRID, linewidth=0.5)


def _timeseries(ax: Axes, panel: Mapping[str, Any], targets: Sequence[Any], t0: float) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    stacked = (panel.get("fieldConfig", {}).get("defaults", {}).get("custom") or {}).get("stacking", {}).get(
        "mode"
    ) == "normal"
    lines = [s for target in targets for s in _series(target["result"], target["legend"])]
    colour = iter(COLORS * 4)
    if stacked and lines:
        grid = sorted({t for _, ts, _ in lines for t in ts})
        stacks = []
        for _, ts, vs in lines:
            by_t = dict(zip(ts, vs, strict=True))
            stacks.append([0.0 if math.isnan(by_t.get(t, 0.0)) else by_t.get(t, 0.0) for t in grid])
        ax.stackplot(
            [t - t0 for t in grid],
            stacks,
            labels=[n for n, _, _ in lines],
            colors=[next(colour) for _ in lines],
            alpha=0.6,
        )
    else:
        for name, ts, vs in lines:
            ax.plot([t - t0 for t in ts], vs, label=name, color=next(colour), linewidth=1.2)
    ax.yaxis.set_major_formatter(lambda v, _: _fmt(v, unit))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0f}s")
    if lines:
        ax.legend(fontsize=5.5, loc="upper left", facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT, ncol=2)


def _stat(ax: Axes, panel: Mapping[str, Any], targets: Sequence[Any], t0: float) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    lines = [s for target in targets for s in _series(target["result"], target["legend"])]
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for i, (name, ts, vs) in enumerate(lines[:3]):
        finite = [(t, v) for t, v in zip(ts, vs, strict=True) if not math.isnan(v)]
        if not finite:
            continue
        last = finite[-1][1]
        y = 0.55 - i * 0.3
        ax.text(
            0.5,
            y,
            _fmt(last, unit),
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=20,
            color=COLORS[i % len(COLORS)],
            weight="bold",
        )
        ax.text(0.5, y - 0.17, name, transform=ax.transAxes, ha="center", va="center", fontsize=7, color=TEXT)
        spark = ax.inset_axes((0.0, 0.0, 1.0, 0.3))
        spark.plot([t - t0 for t, _ in finite], [v for _, v in finite], color=COLORS[i % len(COLORS)], alpha=0.5)
        spark.axis("off")


def _heatmap(ax: Axes, panel: Mapping[str, Any], targets: Sequence[Any], t0: float) -> None:
    buckets = []
    for s in targets[0]["result"]:
        le = s["metric"].get("le", "+Inf")
        buckets.append((math.inf if le == "+Inf" else float(le), s))
    buckets.sort(key=lambda b: b[0])
    if not buckets:
        return
    times = [float(t) for t, _ in buckets[0][1]["values"]]
    cum = [[float(v) for _, v in s["values"]] for _, s in buckets]
    n = min(len(c) for c in cum)
    cells = [[max(cum[i][j] - (cum[i - 1][j] if i else 0.0), 0.0) for j in range(n)] for i in range(len(cum))]
    labels = [("+Inf" if math.isinf(le) else f"{le:g}") for le, _ in buckets]
    ax.imshow(
        cells,
        aspect="auto",
        origin="lower",
        cmap="inferno",
        extent=(times[0] - t0, times[n - 1] - t0, -0.5, len(cells) - 0.5),
    )
    ax.set_yticks(range(len(labels)), [f"≤{lbl} s" for lbl in labels])
    ax.grid(False)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0f}s")


def draw_dashboard(board: Mapping[str, Any], results: Mapping[str, Any], out: Path) -> None:
    """Draw ``board`` (the dashboard JSON) with ``results`` (panel title -> targets' matrices) into ``out``."""
    panels = board["panels"]
    height_units = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width_px, height_px = 1800, height_units * ROW_UNITS + 60
    fig = plt.figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor=BG)
    fig.text(
        0.01,
        1 - 20 / height_px,
        f"{board['title']}  —  {results.get('_caption', '')}",
        color=TEXT,
        fontsize=12,
        va="center",
    )
    t0 = float(results.get("_start", 0.0))
    top = 40  # pixels above the grid: the caption
    for panel in panels:
        g = panel["gridPos"]
        # Pixel box of the grid cell, then room inside it for tick labels (left, below) and the title (above).
        x0, x1 = g["x"] / 24 * width_px, (g["x"] + g["w"]) / 24 * width_px
        y_top = top + g["y"] * ROW_UNITS
        y_bottom = top + (g["y"] + g["h"]) * ROW_UNITS
        if panel["type"] == "row":
            fig.text(
                (x0 + 6) / width_px,
                1 - (y_top + ROW_UNITS * 0.6) / height_px,
                panel["title"],
                color=TEXT,
                fontsize=11,
                weight="bold",
            )
            continue
        box = (x0 + 52, y_bottom - 22, x1 - 10, y_top + 22)  # left, bottom, right, top in pixels from the top
        ax = fig.add_axes(
            (box[0] / width_px, 1 - box[1] / height_px, (box[2] - box[0]) / width_px, (box[1] - box[3]) / height_px)
        )
        _style(ax, panel["title"])
        targets = results[panel["title"]]
        {"timeseries": _timeseries, "stat": _stat, "heatmap": _heatmap}[panel["type"]](ax, panel, targets, t0)
    fig.savefig(out, facecolor=BG)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    saved = json.loads(Path(args[0]).read_text())
    draw_dashboard(saved["dashboard"], saved["results"], Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
