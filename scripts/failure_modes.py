"""Where the full row's masks go wrong, frame by frame (docs/benchmarks.md "Where the weakest
sequences fail").

  python scripts/failure_modes.py DATA [--config F] [--sequences a b ...] [--out DIR]

Runs the full row on each sequence with the tracker's coarse mask recorded, and per frame, at the
processing size, splits the final mask's errors by kind: false positives near the truth (<= 3 px
from it: the boundary) or far from it (drift onto background); misses in thin parts of the truth
(pixels a 5x5 opening removes: legs, lines, a kite's edge), on its boundary (<= 2 px inside) or in
its interior (shrinking, a lost part); what the refiner's accepted proposal added and removed
against the coarse mask, right and wrong; and the object's flow speed. Writes per-frame JSON, a
per-sequence summary (stdout) and one figure per sequence (J, area ratio, error areas).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from hqsmem_ros.ablation import load_sequence
from hqsmem_ros.core.config import load_config
from hqsmem_ros.core.pipeline import HQSMemPipeline, ObjectPrompt
from hqsmem_ros.eval.davis_io import find_sequences


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _frame_record(gt, coarse, final, refined, flow):
    """Error areas of one frame (pixels at the processing size; GT downscaled the same way)."""
    gt_u8 = gt.astype(np.uint8)
    dist_out = cv2.distanceTransform(1 - gt_u8, cv2.DIST_L2, 3)  # distance to the truth
    dist_in = cv2.distanceTransform(gt_u8, cv2.DIST_L2, 3)  # depth inside the truth
    thin = gt & ~cv2.morphologyEx(gt_u8, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)).astype(bool)
    fp, fn = final & ~gt, gt & ~final
    added, removed = final & ~coarse, coarse & ~final
    speed = float(np.median(np.hypot(flow[..., 0], flow[..., 1])[gt])) if flow is not None and gt.any() else 0.0
    return {
        "J": _iou(final, gt), "J_coarse": _iou(coarse, gt), "area_ratio": float(final.sum() / max(1, gt.sum())),
        "gt_area": int(gt.sum()), "refined": bool(refined),
        "fp_near": int((fp & (dist_out <= 3)).sum()), "fp_far": int((fp & (dist_out > 3)).sum()),
        "fn_thin": int((fn & thin).sum()), "fn_edge": int((fn & ~thin & (dist_in <= 2)).sum()),
        "fn_inner": int((fn & ~thin & (dist_in > 2)).sum()), "thin_area": int(thin.sum()),
        "ref_add_obj": int((added & gt).sum()), "ref_add_bg": int((added & ~gt).sum()),
        "ref_cut_obj": int((removed & gt).sum()), "ref_cut_bg": int((removed & ~gt).sum()),
        "speed": speed,
    }


def diagnose(cfg, frames, gts):
    """Per-frame records of the full row on one single-object sequence."""
    pipeline = HQSMemPipeline(cfg)
    tracker = pipeline.tracker
    seen = {}
    original_track = tracker.track

    def recording_track(t, image):
        out = original_track(t, image)
        seen["coarse"] = {k: v.copy() for k, v in out.items()}
        seen["flow"] = getattr(tracker, "_frame_flow", None)
        return out

    tracker.track = recording_track
    records = []
    for k, (image, gt) in enumerate(zip(frames, gts)):
        seen.clear()
        prompts = [ObjectPrompt(1, mask=gt > 0)] if k == 0 else []
        result = pipeline.process(image, prompts=prompts)
        if k == 0:
            continue
        w, h = pipeline._work_wh
        small_gt = cv2.resize((gt > 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA) > 0
        final = cv2.resize((result.label_map() == 1).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        coarse = seen.get("coarse", {}).get(1, np.zeros((h, w), bool))
        refined = any(o.refined for o in result.objects if o.id == 1)
        records.append(_frame_record(small_gt, coarse, final, refined, seen.get("flow")))
    return records


def summary(name, recs) -> str:
    def mean(key):
        return float(np.mean([r[key] for r in recs]))
    gt = mean("gt_area")
    parts = [f"{name:19s} J {mean('J'):.3f} (coarse {mean('J_coarse'):.3f}) area {mean('area_ratio'):.2f}x",
             "FP near/far {:.2f}/{:.2f}".format(mean("fp_near") / gt, mean("fp_far") / gt),
             "FN thin/edge/inner {:.2f}/{:.2f}/{:.2f}".format(mean("fn_thin") / gt, mean("fn_edge") / gt, mean("fn_inner") / gt),
             "refiner +obj/+bg/-obj/-bg {:.3f}/{:.3f}/{:.3f}/{:.3f}".format(
                 mean("ref_add_obj") / gt, mean("ref_add_bg") / gt, mean("ref_cut_obj") / gt, mean("ref_cut_bg") / gt),
             f"accepted {mean('refined'):.2f} speed {mean('speed'):.1f}px"]
    return " | ".join(parts)


def plot(name, recs, out: Path) -> Path:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    x = np.arange(1, len(recs) + 1)
    gt = np.array([max(1, r["gt_area"]) for r in recs], float)
    ax1.plot(x, [r["J"] for r in recs], label="J full (final)", color="#1f77b4")
    ax1.plot(x, [r["J_coarse"] for r in recs], label="J coarse (tracker)", color="#ff7f0e", ls="--")
    ax1.plot(x, [r["area_ratio"] for r in recs], label="area / truth", color="#7f7f7f", ls=":")
    ax1.set_ylim(0, 1.6)
    ax1.set_title(name)
    ax1.legend(loc="lower left", fontsize=8)
    for key, colour in (("fp_far", "#d62728"), ("fp_near", "#ff9896"), ("fn_thin", "#2ca02c"),
                        ("fn_edge", "#98df8a"), ("fn_inner", "#9467bd")):
        ax2.plot(x, np.array([r[key] for r in recs]) / gt, label=key, color=colour)
    ax2.set_ylabel("pixels / truth area")
    ax2.set_xlabel("frame")
    ax2.legend(loc="upper left", fontsize=8, ncol=5)
    path = out / f"failure_{name}.png"
    fig.savefig(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--config", default="config/track.yaml")
    ap.add_argument("--sequences", nargs="*")
    ap.add_argument("--out", default="/tmp/failure_modes")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config).replace(ablation="full", refine=None, teacher_forcing=None, smart_memory=None)
    all_recs = {}
    for seq in find_sequences(args.data):
        if args.sequences and seq.name not in args.sequences:
            continue
        frames, gts = load_sequence(seq)
        recs = diagnose(cfg, frames, gts)
        all_recs[seq.name] = recs
        print(summary(seq.name, recs), flush=True)
        if not args.no_plots:
            plot(seq.name, recs, out)
    (out / "records.json").write_text(json.dumps(all_recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
