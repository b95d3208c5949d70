"""Plots and report.html (hqsmem_ros/eval/plots.py) from real evaluation and benchmark results."""
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from hqsmem_ros.tools.bench import run_bench
from hqsmem_ros.cli import main
from hqsmem_ros.eval.davis_io import write_label
from hqsmem_ros.eval.metrics import evaluate
from hqsmem_ros.eval.plots import plot_bench, plot_eval, plot_latency  # needs matplotlib (extras "test")


def check_png(path):
    assert path.is_file() and path.stat().st_size > 5000, path
    image = cv2.imread(str(path))
    assert image is not None and image.shape[1] >= 600 and image.shape[0] >= 300, path
    assert image.std() > 10  # something is drawn


def referenced(html_path):
    return set(re.findall(r"src='([^']+)'", html_path.read_text()))


def write_sequence(root, name, frames):
    (root / name).mkdir(parents=True)
    for k, label in enumerate(frames):
        write_label(root / name / f"{k:05d}.png", label)


@pytest.fixture()
def folders(tmp_path):
    """Two sequences; object 2 of seq_a leaves on frames 3-5 and is wrongly predicted on frame 4."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for name in ("seq_a", "seq_b"):
        g_frames, p_frames = [], []
        for k in range(8):
            g = np.zeros((48, 64), np.uint8)
            g[10:30, 5 + k:25 + k] = 1
            if name == "seq_b" or not 3 <= k <= 5:
                g[30:45, 40:60] = 2
            p = np.zeros_like(g)
            p[10:30, 6 + k:26 + k] = 1  # one column off: IoU 19/21
            if name == "seq_b" or not 3 <= k <= 5:
                p[30:45, 40:60] = 2
            if name == "seq_a" and k == 4:
                p[0:5, 0:5] = 2
            g_frames.append(g)
            p_frames.append(p)
        write_sequence(gt, name, g_frames)
        write_sequence(pred, name, p_frames)
    return pred, gt


def test_plot_eval_writes_iou_plots_and_a_report(folders, tmp_path):
    pred, gt = folders
    result = evaluate(pred, gt)
    seq = result["sequences"]["seq_a"]
    assert seq["frame_names"] == [f"{k:05d}" for k in range(8)]
    assert seq["objects"][1]["iou_series"] == pytest.approx([19 / 21] * 8)
    assert seq["objects"][2]["present_series"] == [True] * 3 + [False] * 3 + [True] * 2
    assert seq["objects"][2]["iou_series"] == [1, 1, 1, 1, 0, 1, 1, 1]  # absent+predicted = 0
    out = tmp_path / "plots"
    paths = plot_eval(result, out)
    names = sorted(p.name for p in paths)
    assert names == ["iou_seq_a.png", "iou_seq_b.png", "report.html", "scores.png"]
    for p in paths:
        if p.suffix == ".png":
            check_png(p)
    html = (out / "report.html").read_text()
    assert referenced(out / "report.html") == {"iou_seq_a.png", "iou_seq_b.png", "scores.png"}
    assert "seq_a" in html and f"{result['JF']:.3f}" in html


def test_eval_cli_plot_option(folders, tmp_path, capsys):
    pred, gt = folders
    assert main(["eval", str(pred), str(gt), "--plot", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert f"wrote {tmp_path / 'p' / 'report.html'}" in err
    assert referenced(tmp_path / "p" / "report.html") == {"iou_seq_a.png", "iou_seq_b.png", "scores.png"}


def test_plot_bench_memory_and_latency(tmp_path):
    report = run_bench(size=(160, 120), objects=2, frames=60, one_core=False)
    full, base = report["full"]["series"], report["base"]["series"]
    assert full["frame"][0] == 1 and full["frame"][-1] == 60 and len(full["frame"]) == 60
    cap = report["full"]["stats"]["memory_capacity"]
    assert max(full["memory_bank"]) <= cap < base["memory_bank"][-1]  # the base rule keeps growing
    assert all(v > 0 for v in full["rss_mb"])
    out = tmp_path / "bench"
    paths = plot_bench(json.loads(json.dumps(report)), out)  # as read back from `--json`
    assert sorted(p.name for p in paths) == ["latency.png", "memory_bank.png", "memory_usage.png", "report.html"]
    for p in paths[:-1]:
        check_png(p)
    assert referenced(out / "report.html") == {"latency.png", "memory_bank.png", "memory_usage.png"}
    # The command-line way, from the saved JSON.
    (tmp_path / "bench.json").write_text(json.dumps(report))
    r = subprocess.run([sys.executable, "-m", "hqsmem_ros.eval.plots", str(tmp_path / "bench.json"),
                        str(tmp_path / "again")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "memory_bank.png").stat().st_size > 5000


def test_plot_latency_of_a_bag_summary(tmp_path):
    summary = {"stage_ms": {"track": 4.0, "refine": 2.0, "verify": 1.5, "total": 8.0},
               "timing_ms_per_frame": {"overhead": 0.4}}
    (path,) = plot_latency(summary, tmp_path)
    check_png(path)
