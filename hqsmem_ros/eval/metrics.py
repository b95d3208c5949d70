"""DAVIS (J, F, J&F) and VOTS 2023/2024 (Q, Acc, Rob, NRE, DRE, ADQ) measures.

Definitions follow the official benchmarks (DAVIS semi-supervised protocol, VOTS 2023/2024).
Choices where the definitions leave a gap, all applied below:

- Objects of a sequence are the ids found in any of its ground-truth label files. Ids only
  a prediction has are listed as ``extra_pred_ids`` and not scored.
- DAVIS: first and last ground-truth frames are excluded (the first is the given mask); a
  sequence with fewer than 3 ground-truth frames is scored on all of them. Means go per object,
  then per sequence (mean over its objects), then over sequences. Decay splits the frames into
  4 bins at round(linspace(0, n-1, 5)) (bins share their edge frames, halves rounded up) and is
  mean(first bin) - mean(last bin).
- VOTS: every frame with a ground-truth file counts, the first included (the tracker is meant to
  output its given mask there). A frame with no ground-truth file is unknown and skipped.
  Per object: Acc over no T frame is 0 when the target was ever present (a tracker that never
  overlaps it earns nothing) and undefined (NaN) when it never was; Rob/NRE/DRE with
  T+F+M = 0 are NaN; ADQ is computed only for an object with more than 10 absent frames
  (N+H > 10), else NaN. NaN values are left out of every mean; a mean over nothing is NaN.
- Identity switches (in neither benchmark; counted per sequence and summed over sequences, never
  averaged). On every frame with a ground-truth file, the first included, a ground-truth object
  o and a predicted id p (background excluded on both sides) are *associated* when their overlap
  is more than half (``ID_MAJORITY``) of one of them and at least a tenth (``ID_MIN_SHARE``) of
  the other: p is o's mask, or p has moved onto o (even if o keeps its own id on the rest of
  it), or o is covered by p (even if p also covers other things); a few pixels bleeding from
  one object onto another at a crossing are under a tenth and do not count. An association with
  p != o is a wrong pair; the switches of a sequence are its distinct wrong pairs, each counted
  once, on the first frame it appears (``id_switch_events``: [frame, object, id]). So: a swap of
  two objects counts 2; an object absent from the ground truth (occluded, out of view) or lost
  by the tracker adds nothing, and one that re-appears under its own id is no switch, under
  another object's id (or a new id) is one; returning to the own id is not counted; the same
  wrong pair coming back later is not counted again (repeated swaps of two objects count 2).
- A ground-truth frame without a prediction file is scored as an empty prediction and counted
  in ``missing_predictions`` and ``warnings``; a ground-truth sequence with no prediction folder
  has every frame missing. A prediction of another size than its ground truth is a DataError.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from hqsmem_ros.eval.davis_io import DataError, find_label_sequences, list_labels, read_label

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

BOUNDARY_FRACTION = 0.008  # DAVIS: tolerance = ceil(0.008 * image diagonal) pixels
ADQ_MIN_ABSENT = 10  # VOTS: ADQ only where more than this many absent frames
ID_MAJORITY = 0.5  # identity: the overlap must be more than this part of the object or the id ...
ID_MIN_SHARE = 0.1  # ... and at least this part of the other
DAVIS_KEYS = ("J", "F", "JF", "J_recall", "J_decay", "F_recall", "F_decay")
VOTS_KEYS = ("Q", "Acc", "Rob", "NRE", "DRE", "ADQ")


# ---------------------------------------------------------------------------------------------
# Per-frame measures


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two boolean masks; 1 when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Pixels that differ from their right, lower or lower-right neighbour (inside the image)."""
    mask = np.asarray(mask, bool)
    boundary = np.zeros_like(mask)
    boundary[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    boundary[:-1, :] |= mask[:-1, :] != mask[1:, :]
    boundary[:-1, :-1] |= mask[:-1, :-1] != mask[1:, 1:]
    return boundary


def boundary_tolerance(shape: Tuple[int, int], bound: Optional[float] = None) -> int:
    """Tolerance radius in pixels: `bound` >= 1 is pixels, < 1 a fraction of the diagonal."""
    fraction = BOUNDARY_FRACTION if bound is None else bound
    if fraction >= 1:
        return int(math.ceil(fraction))
    return int(math.ceil(fraction * math.hypot(shape[0], shape[1])))


_DISKS: Dict[int, np.ndarray] = {}


def _disk(radius: int) -> np.ndarray:
    if radius not in _DISKS:
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        _DISKS[radius] = (xx * xx + yy * yy <= radius * radius).astype(np.uint8)
    return _DISKS[radius]


def _crop_to_content(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus 2 px (boundaries lie within 1 px of it).

    Outside the box both masks are background, so no boundary pixel is lost and none is added.
    """
    ys, xs = np.nonzero(np.any(pred | gt, axis=1))[0], np.nonzero(np.any(pred | gt, axis=0))[0]
    y0, y1 = max(ys[0] - 2, 0), min(ys[-1] + 3, pred.shape[0])
    x0, x1 = max(xs[0] - 2, 0), min(xs[-1] + 3, pred.shape[1])
    return pred[y0:y1, x0:x1], gt[y0:y1, x0:x1]


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_px: Optional[float] = None) -> float:
    """DAVIS boundary F-measure of two boolean masks.

    Tolerance: `bound_px` pixels (>= 1), or a fraction of the image diagonal (< 1), default
    ceil(0.008 * diagonal). 1 when neither mask has boundary pixels, 0 when only one has.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    radius = boundary_tolerance(pred.shape, bound_px)
    if not (pred.any() or gt.any()):
        return 1.0
    pred, gt = _crop_to_content(pred, gt)
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(np.count_nonzero(pred_b)), int(np.count_nonzero(gt_b))
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    disk = _disk(radius)
    gt_dilated = cv2.dilate(gt_b.view(np.uint8), disk).view(bool)
    pred_dilated = cv2.dilate(pred_b.view(np.uint8), disk).view(bool)
    precision = np.count_nonzero(pred_b & gt_dilated) / n_pred
    recall = np.count_nonzero(gt_b & pred_dilated) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# Statistics helpers


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def davis_decay(values: Sequence[float]) -> float:
    """Mean of the first quarter of the frames minus mean of the last quarter (DAVIS bins)."""
    values = np.asarray(values, float)
    if values.size == 0:
        return float("nan")
    edges = np.floor(np.linspace(0, values.size - 1, 5) + 0.5 + 1e-9).astype(int)
    first, last = values[edges[0] : edges[1] + 1], values[edges[3] : edges[4] + 1]
    return float(np.mean(first) - np.mean(last))


def davis_statistics(values: Sequence[float]) -> Tuple[float, float, float]:
    """(mean, recall = share of frames above 0.5, decay) of per-frame values."""
    values = np.asarray(values, float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    return float(values.mean()), float(np.mean(values > 0.5)), davis_decay(values)


# ---------------------------------------------------------------------------------------------
# Identity


def associate(pred: np.ndarray, gt: np.ndarray, majority: float = ID_MAJORITY,
              min_share: float = ID_MIN_SHARE) -> List[Tuple[int, int]]:
    """Sorted (ground-truth id, predicted id) pairs associated on one frame (module docstring):
    the overlap is more than `majority` of one and at least `min_share` of the other.
    0 (background) is never associated."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"label shapes differ: {pred.shape} vs {gt.shape}")
    size = int(max(pred.max(initial=0), gt.max(initial=0))) + 1
    gt_area = np.bincount(gt.ravel(), minlength=size)
    pred_area = np.bincount(pred.ravel(), minlength=size)
    both = (gt > 0) & (pred > 0)
    # (gt id, pred id) pairs of overlapping pixels, by count: sparse, so 16-bit ids cost nothing.
    keys, counts = np.unique(gt[both].astype(np.int64) * size + pred[both], return_counts=True)
    pairs = []
    for key, inter in zip(keys.tolist(), counts.tolist()):
        obj, pid = divmod(key, size)
        of_obj, of_id = inter / gt_area[obj], inter / pred_area[pid]
        if (of_obj > majority and of_id >= min_share) or (of_id > majority and of_obj >= min_share):
            pairs.append((obj, pid))
    return pairs


class IdentityCounter:
    """Identity switches of one sequence, fed one frame at a time (definition: module docstring)."""

    def __init__(self, majority: float = ID_MAJORITY, min_share: float = ID_MIN_SHARE):
        self.majority, self.min_share = majority, min_share
        self.wrong: set = set()
        self.events: List[Tuple[str, int, int]] = []

    def add(self, name: str, pred: np.ndarray, gt: np.ndarray) -> None:
        for obj, pid in associate(pred, gt, self.majority, self.min_share):
            if pid != obj and (obj, pid) not in self.wrong:
                self.wrong.add((obj, pid))
                self.events.append((name, obj, pid))

    def per_object(self) -> Dict[int, int]:
        counts: Dict[int, int] = {}
        for _, obj, _ in self.events:
            counts[obj] = counts.get(obj, 0) + 1
        return counts


# ---------------------------------------------------------------------------------------------
# Sequence evaluation


class _FrameRecord:
    """Measures of one object on one frame."""

    __slots__ = ("present", "predicted", "iou", "boundary")

    def __init__(self, present: bool, predicted: bool, iou: float, boundary: Optional[float]):
        self.present, self.predicted, self.iou, self.boundary = present, predicted, iou, boundary


def _frame_records(pred: np.ndarray, gt: np.ndarray, with_boundary: bool, radius: int) -> Dict[int, _FrameRecord]:
    """Records for every id present in `pred` or `gt` (others are empty in both)."""
    size = int(max(pred.max(initial=0), gt.max(initial=0))) + 1
    gt_area = np.bincount(gt.ravel(), minlength=size)
    pred_area = np.bincount(pred.ravel(), minlength=size)
    same = pred == gt
    inter = np.bincount(gt[same].ravel(), minlength=size)
    records = {}
    for obj in np.flatnonzero((gt_area > 0) | (pred_area > 0)):
        if obj == 0:
            continue
        union = gt_area[obj] + pred_area[obj] - inter[obj]
        iou = inter[obj] / union
        boundary = boundary_f(pred == obj, gt == obj, radius) if with_boundary else None
        records[int(obj)] = _FrameRecord(bool(gt_area[obj]), bool(pred_area[obj]), float(iou), boundary)
    return records


_EMPTY_RECORD = _FrameRecord(False, False, 1.0, 1.0)


def _vots_object(records: List[_FrameRecord]) -> Dict[str, float]:
    counts = {"N": 0, "H": 0, "T": 0, "M": 0, "F": 0}
    quality, t_overlaps = [], []
    for rec in records:
        if not rec.present:
            counts["H" if rec.predicted else "N"] += 1
            quality.append(0.0 if rec.predicted else 1.0)
        elif rec.iou > 0:
            counts["T"] += 1
            quality.append(rec.iou)
            t_overlaps.append(rec.iou)
        else:
            counts["F" if rec.predicted else "M"] += 1
            quality.append(0.0)
    present = counts["T"] + counts["F"] + counts["M"]
    absent = counts["N"] + counts["H"]
    nan = float("nan")
    result = {
        "Q": float(np.mean(quality)) if quality else nan,
        "Acc": float(np.mean(t_overlaps)) if t_overlaps else (0.0 if present else nan),
        "Rob": counts["T"] / present if present else nan,
        "NRE": counts["M"] / present if present else nan,
        "DRE": counts["F"] / present if present else nan,
        "ADQ": counts["N"] / absent if absent > ADQ_MIN_ABSENT else nan,
    }
    result.update({f"n_{k}": v for k, v in counts.items()})
    return result


def evaluate_sequence_arrays(
    preds: Sequence[Optional[np.ndarray]],
    gts: Sequence[Optional[np.ndarray]],
    frame_names: Optional[Sequence[str]] = None,
    bound: Optional[float] = None,
) -> Dict:
    """Evaluate one sequence from per-frame label maps.

    `gts[k]` None = ground truth unknown on frame k (skipped); `preds[k]` None = no prediction
    file (scored as empty, counted in ``missing_predictions``).
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth frames")
    names = list(frame_names) if frame_names is not None else [f"{k:05d}" for k in range(len(gts))]
    accumulator = _SequenceAccumulator(bound)
    known = [k for k, gt in enumerate(gts) if gt is not None]
    for position, k in enumerate(known):
        accumulator.add(names[k], preds[k], gts[k], _is_davis_frame(position, len(known)))
    return accumulator.result()


def _is_davis_frame(position: int, n_known: int) -> bool:
    return n_known < 3 or 0 < position < n_known - 1


class _SequenceAccumulator:
    """Collects per-frame records one frame at a time, so long sequences stream from disk."""

    def __init__(self, bound: Optional[float] = None):
        self.bound = bound
        self.frames: List[Tuple[bool, Dict[int, _FrameRecord]]] = []
        self.gt_ids: set = set()
        self.pred_ids: set = set()
        self.missing: List[str] = []
        self.names: List[str] = []
        self.identity = IdentityCounter()

    def add(self, name: str, pred: Optional[np.ndarray], gt: np.ndarray, davis_frame: bool) -> None:
        gt = np.asarray(gt)
        if pred is None:
            self.missing.append(name)
            pred = np.zeros_like(gt)
        pred = np.asarray(pred)
        if pred.shape != gt.shape:
            raise DataError(f"frame {name}: prediction size {pred.shape} differs from ground truth {gt.shape}")
        radius = boundary_tolerance(gt.shape, self.bound)
        records = _frame_records(pred, gt, davis_frame, radius)
        self.identity.add(name, pred, gt)
        self.gt_ids.update(i for i, r in records.items() if r.present)
        self.pred_ids.update(i for i, r in records.items() if r.predicted)
        self.frames.append((davis_frame, records))
        self.names.append(name)

    def result(self) -> Dict:
        objects = {}
        switches = self.identity.per_object()
        for obj in sorted(self.gt_ids):
            records = [recs.get(obj, _EMPTY_RECORD) for _, recs in self.frames]
            davis_records = [recs.get(obj, _EMPTY_RECORD) for davis, recs in self.frames if davis]
            j_mean, j_recall, j_decay = davis_statistics([r.iou for r in davis_records])
            f_mean, f_recall, f_decay = davis_statistics([r.boundary for r in davis_records])
            entry = {"J": j_mean, "F": f_mean, "JF": (j_mean + f_mean) / 2, "J_recall": j_recall,
                     "J_decay": j_decay, "F_recall": f_recall, "F_decay": f_decay}
            entry.update(_vots_object(records))
            # Per-frame values (for plots), one per entry of the sequence's ``frame_names``.
            entry["iou_series"] = [r.iou for r in records]
            entry["present_series"] = [r.present for r in records]
            entry["id_switches"] = switches.get(obj, 0)
            objects[obj] = entry
        result = {key: _nanmean(o[key] for o in objects.values()) for key in DAVIS_KEYS + VOTS_KEYS}
        result["JF"] = (result["J"] + result["F"]) / 2
        result.update({
            "objects": objects,
            "n_objects": len(objects),
            "n_frames": len(self.frames),
            "n_davis_frames": sum(1 for davis, _ in self.frames if davis),
            "missing_predictions": len(self.missing),
            "missing_frames": list(self.missing),
            "frame_names": list(self.names),
            "extra_pred_ids": sorted(self.pred_ids - self.gt_ids),
            "id_switches": len(self.identity.events),
            "id_switch_events": [list(e) for e in self.identity.events],
        })
        return result


# ---------------------------------------------------------------------------------------------
# Folder evaluation


def _pair_sequences(pred_dir: PathLike, gt_dir: PathLike) -> Tuple[List[Tuple[str, Optional[str], str]], List[str]]:
    """[(name, pred labels folder or None, gt labels folder)], and names of unmatched predictions."""
    gt_seqs = find_label_sequences(gt_dir)
    if not os.path.isdir(pred_dir):
        raise DataError(f"prediction folder not found: {pred_dir}")
    pred_seqs = find_label_sequences(pred_dir)
    if len(gt_seqs) == 1 and len(pred_seqs) == 1 and not set(gt_seqs) & set(pred_seqs):
        # One sequence against one sequence: pair them whatever the folders are called.
        (gt_name, gt_path), (_, pred_path) = next(iter(gt_seqs.items())), next(iter(pred_seqs.items()))
        return [(gt_name, str(pred_path), str(gt_path))], []
    pairs = [(name, str(pred_seqs[name]) if name in pred_seqs else None, str(path)) for name, path in gt_seqs.items()]
    return pairs, sorted(set(pred_seqs) - set(gt_seqs))


def evaluate_sequence(pred_labels_dir: Optional[PathLike], gt_labels_dir: PathLike, bound: Optional[float] = None) -> Dict:
    """Evaluate one sequence folder of predicted label PNGs against one of ground-truth PNGs."""
    gt_files = list_labels(gt_labels_dir)
    pred_files = {p.stem: p for p in list_labels(pred_labels_dir)} if pred_labels_dir is not None else {}
    accumulator = _SequenceAccumulator(bound)
    for position, gt_path in enumerate(gt_files):
        gt = read_label(gt_path)
        pred_path = pred_files.get(gt_path.stem)
        pred = read_label(pred_path) if pred_path is not None else None
        if pred is not None and pred.shape != gt.shape:
            raise DataError(f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]}, its ground truth "
                            f"{gt_path} is {gt.shape[1]}x{gt.shape[0]}")
        accumulator.add(gt_path.stem, pred, gt, _is_davis_frame(position, len(gt_files)))
    result = accumulator.result()
    gt_stems = {p.stem for p in gt_files}
    result["frames_without_gt"] = sorted(set(pred_files) - gt_stems)
    return result


def evaluate(pred_dir: PathLike, gt_dir: PathLike, bound: Optional[float] = None) -> Dict:
    """Evaluate predicted label PNGs against ground truth, DAVIS and VOTS measures.

    `pred_dir` and `gt_dir` are each one sequence folder of PNGs, a sequence with an
    Annotations/ folder, a DAVIS root, or a folder of sequences (matched by name).
    Returns overall means (keys J, F, JF, J_recall, J_decay, F_recall, F_decay, Q, Acc, Rob,
    NRE, DRE, ADQ; plus ``recall``/``decay`` dicts), ``sequences`` {name: per-sequence result
    with ``objects``}, ``missing_predictions`` (count) and ``warnings`` (messages).
    """
    pairs, unmatched = _pair_sequences(pred_dir, gt_dir)
    sequences, warnings = {}, []
    for name, pred_path, gt_path in pairs:
        seq = evaluate_sequence(pred_path, gt_path, bound)
        sequences[name] = seq
        if pred_path is None:
            warnings.append(f"{name}: no prediction folder in {pred_dir}; all {seq['n_frames']} frames scored as empty")
        elif seq["missing_predictions"]:
            shown = ", ".join(seq["missing_frames"][:5]) + (", ..." if seq["missing_predictions"] > 5 else "")
            warnings.append(f"{name}: {seq['missing_predictions']} ground-truth frames have no prediction file "
                            f"in {pred_path} ({shown}); scored as empty")
        if seq["frames_without_gt"]:
            warnings.append(f"{name}: {len(seq['frames_without_gt'])} prediction files have no ground truth; skipped")
        if seq["extra_pred_ids"]:
            warnings.append(f"{name}: predicted ids {seq['extra_pred_ids']} are not in the ground truth; not scored")
    for name in unmatched:
        warnings.append(f"prediction sequence {name!r} has no ground truth in {gt_dir}; ignored")
    for message in warnings:
        logger.warning(message)
    result = {key: _nanmean(s[key] for s in sequences.values()) for key in DAVIS_KEYS + VOTS_KEYS}
    result["JF"] = (result["J"] + result["F"]) / 2
    result["recall"] = {"J": result["J_recall"], "F": result["F_recall"]}
    result["decay"] = {"J": result["J_decay"], "F": result["F_decay"]}
    result["sequences"] = sequences
    result["n_sequences"] = len(sequences)
    result["id_switches"] = sum(s["id_switches"] for s in sequences.values())
    result["missing_predictions"] = sum(s["missing_predictions"] for s in sequences.values())
    result["warnings"] = warnings
    return result


def _fmt(value: float) -> str:
    return "   -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.3f}"


def format_table(result: Dict) -> str:
    """Human-readable table: one row per sequence, then the mean, then any warnings."""
    columns = ("J", "F", "JF", "Q", "Acc", "Rob", "NRE", "DRE", "ADQ")
    titles = {"JF": "J&F"}
    sequences = result.get("sequences", {})
    width = max([len("sequence"), len("mean")] + [len(n) for n in sequences])
    header = (f"{'sequence':<{width}}  obj  frames  " + " ".join(f"{titles.get(c, c):>6}" for c in columns)
              + "   IDsw  missing")
    lines = [header, "-" * len(header)]
    for name, seq in sequences.items():
        values = " ".join(_fmt(seq[c]) for c in columns)
        lines.append(f"{name:<{width}}  {seq['n_objects']:>3}  {seq['n_frames']:>6}  {values}  "
                     f"{seq['id_switches']:>5}  {seq['missing_predictions']:>7}")
    lines.append("-" * len(header))
    n_obj = sum(s["n_objects"] for s in sequences.values())
    n_frames = sum(s["n_frames"] for s in sequences.values())
    values = " ".join(_fmt(result[c]) for c in columns)
    # The last row holds means, except IDsw and missing: totals over the sequences.
    lines.append(f"{'mean':<{width}}  {n_obj:>3}  {n_frames:>6}  {values}  {result.get('id_switches', 0):>5}  "
                 f"{result.get('missing_predictions', 0):>7}")
    lines.append(f"J recall {_fmt(result['J_recall']).strip()}  J decay {_fmt(result['J_decay']).strip()}  "
                 f"F recall {_fmt(result['F_recall']).strip()}  F decay {_fmt(result['F_decay']).strip()}  "
                 f"(IDsw: identity switches, total; missing: total)")
    for message in result.get("warnings", []):
        lines.append(f"warning: {message}")
    return "\n".join(lines)
