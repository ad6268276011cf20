"""The spike run as a picture, after the source document's figure 13.

Top: the time to first token of every request at the moment it was sent, coloured by who served it
(primary, fallback; failed requests as red crosses at the time they took to fail), the first-byte
timeout as a dashed line, the spike shaded grey, llm-ha's ejections of the primary shaded orange
with their k, the primary's crashes as red lines and its restarts (down) hatched red.
Bottom: requests per second by outcome, so "all traffic goes to the backup" shows.

    python -m llmbench.timeline out/demo            # draw a saved run again (out/demo/timeline.png)

matplotlib is an optional dependency (`pip install -e '.[plot]'`); without it `write_timeline`
raises `PlotUnavailable` with that advice.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

from .scenario import RunResult, down_periods, ejection_periods, load_result, served_by

COLOURS = {"primary": "#1f77b4", "fallback": "#2ca02c", "retried": "#9467bd", "failed": "#d62728",
           "other": "#7f7f7f"}


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed, so no PNG timeline: "
                              "pip install -e '.[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_numbers():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def per_second(result: RunResult) -> tuple[list[float], dict[str, list[int]]]:
    """Requests sent in each one-second bin (wall time), by 'primary', 'fallback', 'failed'."""
    end = max([result.t_end - result.t0, *(r.start - result.t0 for r in result.records)], default=0.0)
    bins = max(1, math.ceil(end))
    counts = {key: [0] * bins for key in ("primary", "fallback", "failed", "other")}
    for r in result.records:
        index = min(bins - 1, max(0, int(r.start - result.t0)))
        who = served_by(r)
        key = "failed" if who is None else who if who in counts else "other"
        counts[key][index] += 1
    return [i + 0.5 for i in range(bins)], counts


def write_timeline(result: RunResult, path: Path | str, title: str | None = None) -> Path:
    """Draw `result` into the PNG at `path`; returns the path. Raises PlotUnavailable without matplotlib."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0, scale = result.t0, result.scale
    end = max([result.t_end - t0, *(r.start - t0 for r in result.records)], default=1.0)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(14, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})

    # the spike, ejections, crashes and down periods
    spike_a, spike_b = result.spike_window
    for axis in (ax, bx):
        axis.axvspan(spike_a - t0, spike_b - t0, color="#bbbbbb", alpha=0.35, lw=0,
                     label="spike" if axis is ax else None)
    ejections = ejection_periods(result.events, "primary", until=result.t_end + 60 * scale)
    for i, e in enumerate(ejections):
        a, b = e["start"] - t0, min(e["end"] - t0, end)
        for axis in (ax, bx):
            axis.axvspan(a, b, color="#ff7f0e", alpha=0.22, lw=0,
                         label="primary ejected by llm-ha" if axis is ax and i == 0 else None)
        duration = f", {e['duration_s'] / scale:g} s" if e.get("duration_s") else ""
        ax.annotate(f"ejected k={e['k']}{duration}", xy=(a, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="#b35900")
    crashes = list(result.primary_stats.get("crash_times") or [])
    for i, (a, b) in enumerate(down_periods(crashes, result.restart_s)):
        for axis in (ax, bx):
            axis.axvspan(a - t0, min(b - t0, end), facecolor="none", edgecolor="#d62728", hatch="//", alpha=0.35,
                         lw=0, label="primary down (restarting)" if axis is ax and i == 0 else None)
            axis.axvline(a - t0, color="#d62728", lw=2, label="primary crash" if axis is ax and i == 0 else None)
        ax.annotate("CRASH (out of GPU memory)", xy=(a - t0, 0.5), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", fontsize=9, color="#d62728", rotation=90,
                    va="center")

    # every request
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for r in result.records:
        who = served_by(r)
        if who is None:
            key, y = "failed", (r.end or r.start) - r.start
        else:
            key, y = (who if who in COLOURS else "other"), r.ttft
        if y is None:
            continue
        if key != "failed" and (r.attempts or 1) > 1:
            key = "retried"
        xs, ys = groups.setdefault(key, ([], []))
        xs.append(r.start - t0)
        ys.append(max(y * 1000, 0.5))
    labels = {"primary": "served by the primary", "fallback": "served by the fallback",
              "retried": "served after a failed attempt (llm-ha retried it)",
              "failed": "failed (time until the error)", "other": "served by another"}
    markers = {"failed": "x", "retried": "^"}
    for key in ("primary", "fallback", "retried", "other", "failed"):
        if key in groups:
            xs, ys = groups[key]
            ax.scatter(xs, ys, s=22 if key in markers else 14, c=COLOURS[key], marker=markers.get(key, "o"),
                       alpha=0.8, linewidths=1 if key == "failed" else 0, label=f"{labels[key]} ({len(xs)})")
    timeout_ms = result.first_byte_timeout_s * 1000
    ax.axhline(timeout_ms, color="black", ls="--", lw=1,
               label=f"first-byte timeout {timeout_ms:g} ms" if result.variant.proxy else
               f"first-byte timeout {timeout_ms:g} ms (not enforced: no proxy)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_plain_numbers())
    low, high = ax.get_ylim()
    if high / max(low, 1e-9) < 30:  # within about a decade and a half, label the minor ticks too
        ax.yaxis.set_minor_formatter(_plain_numbers())
    ax.set_ylabel("time to first token (ms)")
    ax.grid(True, which="both", axis="y", alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9, borderaxespad=0)

    # requests per second by outcome
    centres, counts = per_second(result)
    bottom = [0] * len(centres)
    for key in ("primary", "fallback", "other", "failed"):
        if any(counts[key]):
            bx.bar(centres, counts[key], width=1.0, bottom=bottom, color=COLOURS[key], alpha=0.8, lw=0)
            bottom = [b + c for b, c in zip(bottom, counts[key])]
    bx.set_ylabel("requests / s")
    bx.set_xlabel("seconds since the load started" + ("" if math.isclose(scale, 1.0) else " (wall time)"))
    bx.set_xlim(0, end)
    if not math.isclose(scale, 1.0):
        top = ax.secondary_xaxis("top", functions=(lambda x: x / scale, lambda x: x * scale))
        top.set_xlabel(f"the document's seconds (time scale {scale:g})")

    served = Counter(served_by(r) for r in result.records)
    failed = served.get(None, 0)
    heading = title or f"{result.variant.title}: traffic spike"
    ax.set_title(f"{heading}\n{len(result.records)} requests: {served.get('primary', 0)} by the primary, "
                 f"{served.get('fallback', 0)} by the fallback, {failed} failed; primary crashes: {len(crashes)}"
                 f"; ejections: {len(ejections)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmbench.timeline", description="Draw a saved spike run as a PNG.")
    p.add_argument("folder", help="a run's folder (with run.json, records.jsonl, events.jsonl), e.g. out/demo")
    p.add_argument("--out", help="the PNG; default FOLDER/timeline.png")
    args = p.parse_args(argv)
    try:
        path = write_timeline(load_result(args.folder), args.out or Path(args.folder) / "timeline.png")
    except PlotUnavailable as exc:
        sys.exit(str(exc))
    print(path)


if __name__ == "__main__":
    main()
