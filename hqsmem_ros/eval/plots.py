"""Plots and an HTML report of evaluations and benchmarks (matplotlib, headless, ROS-free).

  plot_eval(result, out_dir)      per-object IoU over time for each sequence, scores per sequence
                                  (result: hqsmem_ros.eval.metrics.evaluate; `hqsmem eval --plot DIR`)
  plot_memory(report, out_dir)    memory bank size, tracker memory and process (GPU) memory against
                                  the frame count, HQ-SMem vs the base tracker's own memory rule
                                  (the paper's Figure 4; report: `hqsmem bench --json`)
  plot_latency(report, out_dir)   per-stage latency, HQ-SMem vs base (bench report, or a bag summary)
  plot_bench(report, out_dir)     plot_memory + plot_latency + report.html
  write_report(out_dir, ...)      report.html linking the PNGs (beside it) with the key numbers

Each function returns the paths it wrote. From saved JSON:

  python -m hqsmem_ros.eval.plots bench.json OUT_DIR     (a `hqsmem bench --json` report)
  python -m hqsmem_ros.eval.plots eval.json OUT_DIR      (a metrics.evaluate result saved with json.dump)
"""
from __future__ import annotations

import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, Path]

# Colours that stay apart for up to 10 objects; ids beyond cycle.
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f")
HQSMEM_COLOUR, BASE_COLOUR = "#1f77b4", "#d62728"


def _figure(width: float, height: float):
    # A Figure without pyplot: no global state, no display backend, safe in threads.
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"plots need matplotlib ({exc}): pip install matplotlib, or hqsmem_ros[plots]") from exc

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "sequence"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


# ---------------------------------------------------------------------------------------------
# Evaluation


def _runs(flags: Sequence[bool]) -> List[Tuple[int, int]]:
    """[start, end) ranges where flags is True."""
    runs, start = [], None
    for k, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = k
        elif not f and start is not None:
            runs.append((start, k))
            start = None
    return runs


def plot_sequence_iou(name: str, seq: Dict[str, Any], out_dir: PathLike) -> Optional[Path]:
    """IoU of each object over the frames of one sequence; grey bands where an object is absent.

    Frames where an object is absent from the ground truth but predicted are marked with x at 0
    (a false positive); absent and not predicted is correct and not drawn. Needs the per-frame
    series of metrics (``iou_series``, ``present_series``); returns None without them.
    """
    objects = seq.get("objects", {})
    if not objects or any("iou_series" not in o for o in objects.values()):
        return None
    names = seq.get("frame_names") or [str(k) for k in range(len(next(iter(objects.values()))["iou_series"]))]
    n = len(names)
    fig = _figure(9.0, 3.6 + 0.18 * math.ceil(len(objects) / 4))
    ax = fig.subplots()
    for k, (oid, o) in enumerate(sorted(objects.items(), key=lambda kv: int(kv[0]))):
        colour = _COLOURS[k % len(_COLOURS)]
        present = o["present_series"]
        iou = [v if p else math.nan for v, p in zip(o["iou_series"], present)]
        label = f"object {oid} (J {_fmt(o.get('J'), 2)}, Q {_fmt(o.get('Q'), 2)})"
        ax.plot(range(n), iou, color=colour, lw=1.4, label=label)
        false_pos = [x for x, (v, p) in enumerate(zip(o["iou_series"], present)) if not p and v < 1.0]
        if false_pos:
            ax.plot(false_pos, [0.0] * len(false_pos), "x", color=colour, ms=5)
        for a, b in _runs([not p for p in present]):
            ax.axvspan(a - 0.5, b - 0.5, color=colour, alpha=0.07, lw=0)
    ax.set_xlim(-0.5, max(n - 0.5, 0.5))
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("frame" + (f"  ({names[0]} ... {names[-1]})" if n > 1 else ""))
    ax.set_ylabel("IoU with ground truth")
    ax.set_title(f"{name}: per-object IoU over time (J&F {_fmt(seq.get('JF'), 3)}, Q {_fmt(seq.get('Q'), 3)}); "
                 "shaded: object absent, x: predicted while absent", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=7, ncol=min(4, len(objects)), frameon=False)
    return _save(fig, Path(out_dir) / f"iou_{_slug(name)}.png")


def plot_scores(result: Dict[str, Any], out_dir: PathLike) -> Optional[Path]:
    """J, F and Q of every sequence, and their means."""
    seqs = result.get("sequences", {})
    if not seqs:
        return None
    names = list(seqs) + ["mean"]
    keys = (("J", "#1f77b4"), ("F", "#ff7f0e"), ("Q", "#2ca02c"))
    fig = _figure(max(6.0, 0.9 * len(names) + 2.5), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(keys)
    for j, (key, colour) in enumerate(keys):
        values = [seqs[s].get(key, math.nan) for s in seqs] + [result.get(key, math.nan)]
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(xs, [0 if math.isnan(v) else v for v in values], width, color=colour, label=key)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"DAVIS J, F and VOTS Q per sequence (mean J&F {_fmt(result.get('JF'))}, Q {_fmt(result.get('Q'))})",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    return _save(fig, Path(out_dir) / "scores.png")


def plot_eval(result: Dict[str, Any], out_dir: PathLike) -> List[Path]:
    """Per-sequence IoU-over-time plots, a scores chart and report.html; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: List[Path] = []
    scores = plot_scores(result, out)
    if scores is not None:
        paths.append(scores)
    notes = []
    for name, seq in result.get("sequences", {}).items():
        p = plot_sequence_iou(name, seq, out)
        if p is not None:
            paths.append(p)
        else:
            notes.append(f"{name}: no per-frame values in this result (evaluate with this version of metrics)")
    cols = ("J", "F", "JF", "Q", "Acc", "Rob", "NRE", "DRE", "ADQ")
    rows = [[name, seq.get("n_objects"), seq.get("n_frames")] + [seq.get(c) for c in cols]
            for name, seq in result.get("sequences", {}).items()]
    rows.append(["mean", "", ""] + [result.get(c) for c in cols])
    tables = [("Scores", ["sequence", "objects", "frames"] + [c.replace("JF", "J&F") for c in cols], rows)]
    paths.append(write_report(out, "HQ-SMem evaluation", paths, tables,
                              notes=list(result.get("warnings", [])) + notes))
    return paths


# ---------------------------------------------------------------------------------------------
# Benchmarks


def _series(run: Dict[str, Any]) -> Dict[str, List[float]]:
    s = run.get("series")
    if s and s.get("frame"):
        return s
    # Older reports: only the subsampled bank sizes.
    sizes = run.get("memory_bank_over_frames") or []
    return {"frame": list(range(1, len(sizes) + 1)), "memory_bank": sizes, "subsampled": True}


def plot_memory(report: Dict[str, Any], out_dir: PathLike) -> List[Path]:
    """Memory against frame count, HQ-SMem (full) vs the base tracker's own rule (paper Fig. 4).

    memory_bank.png: left, the distribution of the memory bank size over the frames (box plot);
    right, the bank size against the frame number; the y axis is shared. memory_usage.png: the
    tracker's memory in MB and the process RSS (and GPU memory when measured) against the frame.
    """
    out = Path(out_dir)
    runs = [("HQ-SMem", report["full"], HQSMEM_COLOUR), ("base tracker, own rule", report["base"], BASE_COLOUR)]
    paths = []
    fig = _figure(9.5, 3.8)
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=[1, 3])
    data = [_series(r)["memory_bank"] for _, r, _ in runs]
    box = left.boxplot(data, patch_artist=True, widths=0.6)
    left.set_xticks([1, 2], ["HQ-SMem", "base"])
    for patch, (_, _, colour) in zip(box["boxes"], runs):
        patch.set_facecolor(colour)
        patch.set_alpha(0.35)
    left.set_ylabel("frames in long-term memory")
    left.grid(axis="y", alpha=0.3)
    for name, run, colour in runs:
        s = _series(run)
        right.plot(s["frame"], s["memory_bank"], color=colour, lw=1.6, label=name)
    cap = report.get("full", {}).get("stats", {}).get("memory_capacity")
    if cap:
        right.axhline(cap, color=HQSMEM_COLOUR, ls=":", lw=1, label=f"capacity K = {cap}")
    right.set_xlabel("frame")
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Memory bank size per frame, {report.get('size', '?')}, {report.get('objects', '?')} objects, "
                 f"{report.get('frames', '?')} frames", fontsize=10)
    paths.append(_save(fig, out / "memory_bank.png"))

    if all("rss_mb" in _series(r) for _, r, _ in runs):
        has_gpu = all(_series(r).get("gpu_mb") for _, r, _ in runs)
        fig = _figure(9.5, 3.6)
        axes = fig.subplots(1, 3 if has_gpu else 2)
        keys = [("memory_mb", "tracker memory (MB)"), ("rss_mb", "process RSS (MB)")]
        if has_gpu:
            keys.append(("gpu_mb", "GPU memory allocated (MB)"))
        for ax, (key, title) in zip(axes, keys):
            for name, run, colour in runs:
                s = _series(run)
                ax.plot(s["frame"], s[key], color=colour, lw=1.4, label=name)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("frame")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("Memory use against the frame count (full and base run one after the other in one "
                     "process: RSS includes what the first run left)", fontsize=9)
        paths.append(_save(fig, out / "memory_usage.png"))
    return paths


def _stage_table(report: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    if "full" in report and "base" in report:
        return {"HQ-SMem": report["full"]["stage_ms"], "base tracker": report["base"]["stage_ms"]}
    if "stage_ms" in report:  # an `hqsmem bag --json` summary
        stages = dict(report["stage_ms"])
        timing = report.get("timing_ms_per_frame", {})
        if timing:
            stages["bag overhead"] = timing.get("overhead", 0.0)
        return {"hqsmem bag": stages}
    return {k: v for k, v in report.items() if isinstance(v, dict)}


def plot_latency(report: Dict[str, Any], out_dir: PathLike) -> List[Path]:
    """Per-stage milliseconds per frame as grouped bars (stages of HQSMemPipeline.process)."""
    table = _stage_table(report)
    stages = [s for s in dict.fromkeys(k for t in table.values() for k in t) if s != "total"]
    fig = _figure(max(6.5, 0.75 * len(stages) + 2.5), 3.6)
    ax = fig.subplots()
    width = 0.8 / max(1, len(table))
    colours = [HQSMEM_COLOUR, BASE_COLOUR] + list(_COLOURS[2:])
    for j, (name, values) in enumerate(table.items()):
        xs = [i + (j - (len(table) - 1) / 2) * width for i in range(len(stages))]
        bars = ax.bar(xs, [values.get(s, 0.0) for s in stages], width, color=colours[j % len(colours)],
                      label=f"{name} (total {values.get('total', sum(values.values())):.1f} ms)")
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(range(len(stages)), stages, fontsize=8)
    ax.set_ylabel("ms per frame")
    title = "Per-stage latency"
    if "size" in report:
        title += f", {report['size']}, {report.get('objects', '?')} objects"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, Path(out_dir) / "latency.png")]


def plot_bench(report: Dict[str, Any], out_dir: PathLike) -> List[Path]:
    """plot_memory + plot_latency + report.html for a `hqsmem bench --json` report."""
    out = Path(out_dir)
    paths = plot_memory(report, out) + plot_latency(report, out)
    f, b = report["full"], report["base"]
    rows = [
        ["frames/s", f.get("fps"), b.get("fps")],
        ["ms per frame", f.get("ms_per_frame"), b.get("ms_per_frame")],
        ["memory bank max (frames)", f.get("memory_bank_max"), b.get("memory_bank_max")],
        ["memory bank at the end", f.get("memory_bank_final"), b.get("memory_bank_final")],
        ["peak RSS (MB)", f.get("peak_rss_mb"), b.get("peak_rss_mb")],
    ]
    gpu = report.get("gpu") or {}
    notes = [f"{report.get('size')} frames, {report.get('objects')} objects, {report.get('frames')} frames; "
             f"core pinned: {report.get('pinned_core')}; random weights: {report.get('random_weights', False)}"]
    if gpu:
        notes.append(f"GPU {gpu.get('device')}: peak allocated {gpu.get('peak_gpu_mb', 0):.0f} MB")
    paths.append(write_report(out, "HQ-SMem benchmark", paths,
                              [("Summary", ["", "HQ-SMem", "base tracker"], rows)], notes=notes))
    return paths


# ---------------------------------------------------------------------------------------------
# HTML


def write_report(out_dir: PathLike, title: str, images: Iterable[PathLike],
                 tables: Sequence[Tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = (),
                 notes: Sequence[str] = ()) -> Path:
    """report.html in out_dir: the tables, notes, then every PNG (linked by its file name, so the
    folder can be moved or zipped as a whole)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}img{max-width:100%;margin:1em 0;"
             "border:1px solid #eee}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for caption, header, rows in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for image in images:
        image = Path(image)
        if image.suffix.lower() != ".png":
            continue
        rel = image.name if image.parent.resolve() == out.resolve() else str(image)
        parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(image.stem)}'>"
                     f"<figcaption>{html.escape(image.name)}</figcaption></figure>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-3].strip(), file=sys.stderr)
        print("usage: python -m hqsmem_ros.eval.plots REPORT.json OUT_DIR", file=sys.stderr)
        return 2
    src, out = argv
    try:
        report = json.loads(Path(src).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"plots: error: cannot read {src}: {exc}", file=sys.stderr)
        return 2
    if "full" in report and "base" in report:
        paths = plot_bench(report, out)
    elif "sequences" in report:
        paths = plot_eval(report, out)
    elif "stage_ms" in report:
        paths = plot_latency(report, out)
        paths.append(write_report(out, "hqsmem bag", paths))
    else:
        print(f"plots: error: {src} is neither a bench report, an evaluation nor a bag summary", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
