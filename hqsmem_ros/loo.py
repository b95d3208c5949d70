"""`hqsmem loo`: leave-one-out choice of parameters over a folder of sequences.

A parameter is never chosen on the sequence it is scored on: every candidate parameter set of a
grid runs on every sequence once (semi-supervised protocol, as `hqsmem ablate`); then, for each
held-out sequence, the candidate with the best mean J&F over the *other* sequences is picked and
scored on the held-out one. The leave-one-out figure is the mean of those held-out scores. The
figure of the single final set (the candidate best over all sequences) is reported per sequence
beside it; the gap between the two says how much the choice itself is tuned to the data.

A grid file is YAML: a mapping from candidate name to pipeline overrides, applied on top of the
base config (`--config`); the component sections (`tracker`, `refiner`, `features`) are merged
key by key, so `{tracker: {guided_radius: 4}}` keeps the tracker's type and other settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import yaml

from .ablation import run_sequence
from .core.config import ConfigError, PipelineConfig, load_config
from .eval.davis_io import DataError, find_sequences, list_frames, list_labels, read_frame, read_label
from .eval.metrics import evaluate_sequence_arrays

_COMPONENTS = ("tracker", "refiner", "features")


def apply_overrides(base: PipelineConfig, overrides: Mapping[str, Any]) -> PipelineConfig:
    """`base` with `overrides` applied; component sections are merged key by key."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"a candidate must be a mapping of config keys, got {overrides!r}")
    d = base.to_dict()
    for key, value in overrides.items():
        if key in _COMPONENTS and isinstance(value, Mapping) and isinstance(d.get(key), dict):
            if "type" in value and value["type"] != d[key].get("type"):
                d[key] = dict(value)  # another model: its own settings only
            else:
                d[key] = {**d[key], **value}
        else:
            d[key] = value
    return PipelineConfig.from_dict(d)


def load_grid(path: Union[str, Path]) -> Dict[str, Dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    try:
        grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"grid file {path} is not valid YAML: {exc}") from exc
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"grid file {path} must map candidate names to config overrides")
    return {str(k): (v or {}) for k, v in grid.items()}


def leave_one_out(scores: Mapping[str, Mapping[str, float]]) -> Dict[str, Any]:
    """scores[candidate][sequence] -> the leave-one-out result.

    Ties go to the candidate listed first. Needs at least 2 sequences."""
    cands = list(scores)
    if not cands:
        raise ValueError("no candidates")
    seqs = list(scores[cands[0]])
    if len(seqs) < 2:
        raise ValueError("leave-one-out needs at least 2 sequences")
    for c in cands:
        if list(scores[c]) != seqs:
            raise ValueError(f"candidate {c!r} was scored on other sequences")
    table = np.array([[scores[c][s] for s in seqs] for c in cands], dtype=np.float64)
    picks = {}
    for j, s in enumerate(seqs):
        others = np.delete(table, j, axis=1).mean(axis=1)
        k = int(np.argmax(others))
        picks[s] = {"chosen": cands[k], "score": float(table[k, j])}
    final = int(np.argmax(table.mean(axis=1)))
    return {
        "sequences": seqs,
        "candidates": cands,
        "loo": picks,
        "loo_mean": float(np.mean([p["score"] for p in picks.values()])),
        "final": cands[final],
        "final_mean": float(table[final].mean()),
        "final_per_sequence": {s: float(table[final, j]) for j, s in enumerate(seqs)},
        "oracle_mean": float(table.max(axis=0).mean()),  # best candidate per sequence: tuned, for scale only
    }


def run_loo(data_root, grid: Mapping[str, Mapping[str, Any]], config=None, metric: str = "JF") -> Dict[str, Any]:
    base = load_config(config)
    cfgs = {name: apply_overrides(base, ov) for name, ov in grid.items()}  # every candidate checked first
    sequences = find_sequences(data_root)
    if len(sequences) < 2:
        raise DataError(f"{data_root}: leave-one-out needs at least 2 sequences, found {len(sequences)}")
    scores: Dict[str, Dict[str, float]] = {name: {} for name in cfgs}
    for seq in sequences:
        if seq.frames_dir is None or seq.labels_dir is None:
            raise DataError(f"sequence {seq.name!r} needs both frames and annotations")
        frame_paths = list_frames(seq.frames_dir)
        gts = [read_label(p) for p in list_labels(seq.labels_dir)]
        if len(gts) != len(frame_paths):
            raise DataError(f"sequence {seq.name!r}: {len(frame_paths)} frames but {len(gts)} annotations")
        frames = [read_frame(p) for p in frame_paths]
        for name, cfg in cfgs.items():
            preds, _ = run_sequence(cfg, frames, gts)  # no StreamSession: why in run_sequence
            scores[name][seq.name] = float(evaluate_sequence_arrays(preds, gts)[metric])
    out = leave_one_out(scores)
    out["metric"] = metric
    out["scores"] = scores
    return out


def format_loo(result: Mapping[str, Any]) -> str:
    seqs: List[str] = result["sequences"]
    width = max(8, max(len(c) for c in result["candidates"]))
    lines = [f"{result.get('metric', 'JF')} per sequence and candidate"]
    head = f"{'candidate':{width}s} " + " ".join(f"{s[:10]:>10s}" for s in seqs) + "     mean"
    lines += [head, "-" * len(head)]
    for c in result["candidates"]:
        row = result["scores"][c] if "scores" in result else None
        if row is not None:
            lines.append(f"{c:{width}s} " + " ".join(f"{row[s]:10.3f}" for s in seqs)
                         + f" {np.mean([row[s] for s in seqs]):8.3f}")
    lines.append("")
    lines.append("leave-one-out (chosen on the other sequences, scored on the held-out one):")
    for s in seqs:
        p = result["loo"][s]
        lines.append(f"  {s:24s} {p['chosen']:{width}s} {p['score']:.3f}")
    lines.append(f"leave-one-out mean: {result['loo_mean']:.3f}")
    lines.append(f"final set (best on all): {result['final']}, mean {result['final_mean']:.3f}; "
                 f"per-sequence best (tuned, for scale only): {result['oracle_mean']:.3f}")
    return "\n".join(lines)
