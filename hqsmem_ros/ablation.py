"""`hqsmem ablate`: the paper's ablation rows (supp. Table 1) on a folder of sequences.

Semi-supervised protocol: an object is given by its ground-truth mask on the first frame where it
appears (DAVIS 2017 convention); every later frame is the tracker's. Predictions stay in memory.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .core.config import ABLATIONS, load_config
from .core.pipeline import HQSMemPipeline, ObjectPrompt
from .eval.davis_io import DataError, find_sequences, list_frames, list_labels, read_frame, read_label
from .eval.metrics import evaluate_sequence_arrays

KEYS = ("J", "F", "JF", "Q", "Acc", "Rob", "NRE", "DRE", "ADQ")


def run_sequence(cfg, frames: Sequence, gts: Sequence[np.ndarray]):
    # No StreamSession: one fixed-size sequence without stamps, ids from the annotation, none removed.
    pipeline = HQSMemPipeline(cfg)
    preds, seen = [], set()
    elapsed = 0.0
    for image, gt in zip(frames, gts):
        ids = [int(i) for i in np.unique(gt) if i != 0 and int(i) not in seen]
        prompts = [ObjectPrompt(i, mask=gt == i) for i in ids]
        seen.update(ids)
        t0 = time.perf_counter()
        preds.append(pipeline.process(image, prompts=prompts).label_map())
        elapsed += time.perf_counter() - t0
    return preds, elapsed


def load_sequence(seq, stride: int = 1):
    """(frames, label maps) of one sequence found by `find_sequences`, every `stride`th frame."""
    if seq.frames_dir is None or seq.labels_dir is None:
        raise DataError(f"sequence {seq.name!r} needs both frames and annotations")
    frame_paths = list_frames(seq.frames_dir)
    label_paths = list_labels(seq.labels_dir)
    if len(label_paths) != len(frame_paths):
        raise DataError(f"sequence {seq.name!r}: {len(frame_paths)} frames but {len(label_paths)} annotations")
    return [read_frame(p) for p in frame_paths[::stride]], [read_label(p) for p in label_paths[::stride]]


def run_ablation(data_root, rows: Optional[List[str]] = None, config=None, stride: int = 1) -> Dict:
    """`stride` N > 1 keeps every Nth frame (and annotation) of each sequence: N times the motion
    between frames, a stress test of the same data."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise DataError(f"stride must be an integer >= 1, got {stride!r}")
    rows = list(rows or ABLATIONS)
    base = load_config(config)
    sequences = find_sequences(data_root)
    out: Dict = {"rows": {}, "sequences": [s.name for s in sequences], "stride": stride}
    per_row: Dict[str, List[Dict]] = {r: [] for r in rows}
    fps: Dict[str, List[float]] = {r: [] for r in rows}
    for seq in sequences:
        frames, gts = load_sequence(seq, stride)
        for row in rows:
            cfg = base.replace(ablation=row, refine=None, teacher_forcing=None, smart_memory=None)
            preds, elapsed = run_sequence(cfg, frames, gts)
            res = evaluate_sequence_arrays(preds, gts)
            res["name"] = seq.name
            per_row[row].append(res)
            fps[row].append(len(frames) / max(elapsed, 1e-9))
    for row in rows:
        seqs = per_row[row]
        summary = {k: float(np.nanmean([s[k] for s in seqs])) for k in KEYS}
        summary["id_switches"] = int(sum(s["id_switches"] for s in seqs))  # a total, not a mean
        summary["fps"] = float(np.mean(fps[row]))
        summary["per_sequence"] = {s["name"]: {k: s[k] for k in ("J", "F", "JF", "Q", "id_switches")} for s in seqs}
        out["rows"][row] = summary
    return out


def format_ablation(result: Dict) -> str:
    """One row per ablation: means over the sequences, IDsw = identity switches in total."""
    head = f"{'row':10s} " + " ".join(f"{k:>6s}" for k in KEYS) + "   IDsw    fps"
    lines = [head, "-" * len(head)]
    for row, s in result["rows"].items():
        lines.append(f"{row:10s} " + " ".join(f"{s[k]:6.3f}" for k in KEYS) + f" {s['id_switches']:6d} {s['fps']:6.1f}")
    return "\n".join(lines)
