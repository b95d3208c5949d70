"""Camera conditions the profiles were not tuned on: DAVIS frames as a robot's camera gives them.

    python -m hqsmem_ros.eval.perturb DATA_DIR --config config/track.yaml [--config OTHER.yaml]

Each perturbation is applied to every frame of every sequence (deterministically: the same seed
gives the same pixels), the pipeline runs on what results, and its masks are scored against the
original annotations at the original size, so every row is comparable with `clean`:

- ``jpeg50``: JPEG at quality 50, as a compressed image transport (`image_transport` compressed);
- ``noise``: sensor noise, Gaussian with a read-noise floor plus shot noise that grows with the
  pixel value (std about 4 in the shadows, 8 in the highlights, of 255), per pixel and channel;
- ``exposure``: a gain ramp over the sequence, 0.6x at the prompt frame to 1.4x at the last
  (auto-exposure settling, clouds, a robot driving into light), clipped at 255;
- ``dark``: 0.6x throughout (an underexposed camera: indoors, a fixed exposure set for daylight);
- ``half``: half the resolution (area downscaling; the prompt mask downscaled with it, the masks
  scaled back up, nearest, for scoring);
- ``drop``: a quarter of the frames never arrive (each frame after the prompt independently);
  only the frames that arrive are scored;
- ``robot``: exposure ramp, then noise, then JPEG 50 (all three at once).

Measurement only: nothing is chosen on these runs (docs/benchmarks.md "Camera conditions").
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np

from ..ablation import load_sequence, run_sequence
from ..core.config import load_config
from .davis_io import find_sequences
from .metrics import evaluate_sequence_arrays

_JPEG_QUALITY = 50
_READ_NOISE = 4.0  # std (of 255) where the pixel is black
_SHOT_GAIN = 0.2  # variance added per unit of pixel value: std sqrt(16 + 0.2 * 255) = 8.2 at white
_GAIN_RAMP = (0.6, 1.4)  # exposure gain at the first and the last frame
_DARK_GAIN = 0.6  # the underexposed camera's gain, the ramp's start
_DROP_RATE = 0.25

KINDS = ("clean", "jpeg50", "noise", "exposure", "dark", "half", "drop", "robot")


@dataclass
class Perturbed:
    """What the camera delivers: `frames` for the pipeline, `prompts` (label maps at the frames'
    size, for the objects' first masks), and `kept`, the original frame index of each."""

    frames: List[np.ndarray]
    prompts: List[np.ndarray]
    kept: List[int]


def _rng(seed: int, name: str, frame: int) -> np.random.Generator:
    # One stream per (seed, sequence, frame): a frame's pixels do not depend on which others ran.
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), frame])


def jpeg(image: np.ndarray, quality: int = _JPEG_QUALITY) -> np.ndarray:
    """An RGB frame through JPEG encoding and decoding."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def sensor_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Read noise plus shot noise (variance growing with the pixel value), clipped to uint8."""
    x = image.astype(np.float32)
    std = np.sqrt(_READ_NOISE ** 2 + _SHOT_GAIN * x)
    noisy = x + std * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def exposure_gain(position: int, count: int) -> float:
    """The gain at frame `position` of `count`: linear from the first to the last of _GAIN_RAMP."""
    lo, hi = _GAIN_RAMP
    return lo if count < 2 else lo + (hi - lo) * position / (count - 1)


def exposed(image: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(np.rint(image.astype(np.float32) * gain), 0, 255).astype(np.uint8)


def _per_frame(frames: Sequence[np.ndarray], name: str, seed: int,
               fn: Callable[[np.ndarray, int, int, np.random.Generator], np.ndarray]) -> List[np.ndarray]:
    n = len(frames)
    return [fn(f, k, n, _rng(seed, name, k)) for k, f in enumerate(frames)]


def _half(frames, gts) -> Perturbed:
    h, w = frames[0].shape[:2]
    size = (max(1, w // 2), max(1, h // 2))
    small = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
    prompts = [cv2.resize(g, size, interpolation=cv2.INTER_NEAREST) for g in gts]
    return Perturbed(small, prompts, list(range(len(frames))))


def _drop(frames, gts, name: str, seed: int) -> Perturbed:
    # A frame where an object first appears carries its prompt: it always arrives.
    seen: set = set()
    kept = []
    for k, gt in enumerate(gts):
        ids = set(int(i) for i in np.unique(gt)) - {0}
        first = k == 0 or not ids <= seen
        seen |= ids
        if first or _rng(seed, name, k).random() >= _DROP_RATE:
            kept.append(k)
    return Perturbed([frames[k] for k in kept], [gts[k] for k in kept], kept)


def perturb(kind: str, frames: Sequence[np.ndarray], gts: Sequence[np.ndarray], name: str = "",
            seed: int = 0) -> Perturbed:
    """`frames` (RGB uint8) and their label maps `gts` as the camera condition `kind` delivers
    them; `name` (the sequence's) and `seed` pick the random streams."""
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(KINDS)}")
    if len(frames) != len(gts) or not frames:
        raise ValueError(f"need as many label maps as frames (at least one): {len(frames)} frames, {len(gts)} labels")
    everything = list(range(len(frames)))
    if kind == "half":
        return _half(frames, gts)
    if kind == "drop":
        return _drop(frames, gts, name, seed)
    steps: Dict[str, Callable[[np.ndarray, int, int, np.random.Generator], np.ndarray]] = {
        "clean": lambda f, k, n, r: f,
        "jpeg50": lambda f, k, n, r: jpeg(f),
        "noise": lambda f, k, n, r: sensor_noise(f, r),
        "exposure": lambda f, k, n, r: exposed(f, exposure_gain(k, n)),
        "dark": lambda f, k, n, r: exposed(f, _DARK_GAIN),
        "robot": lambda f, k, n, r: jpeg(sensor_noise(exposed(f, exposure_gain(k, n)), r)),
    }
    return Perturbed(_per_frame(frames, name, seed, steps[kind]), list(gts), everything)


def score_perturbed(cfg, frames, gts, kind: str, name: str = "", seed: int = 0) -> Dict:
    """Run `cfg` on the perturbed sequence; its masks scored against the original `gts` (scaled
    back to their size, only the frames that arrived)."""
    p = perturb(kind, frames, gts, name, seed)
    preds, _ = run_sequence(cfg, p.frames, p.prompts)
    h, w = gts[0].shape[:2]
    preds = [m if m.shape[:2] == (h, w) else cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in preds]
    return evaluate_sequence_arrays(preds, [gts[k] for k in p.kept])


def run_perturbations(data_root, configs: Sequence[str], kinds: Sequence[str] = KINDS, row: str = "full",
                      seed: int = 0) -> Dict:
    """J&F per sequence for every (config, perturbation): result["scores"][config][kind][sequence]."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown perturbation(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    cfgs = {c: load_config(c).replace(ablation=row, refine=None, teacher_forcing=None, smart_memory=None)
            for c in configs}  # every config checked before the first run
    scores: Dict = {c: {k: {} for k in kinds} for c in configs}
    switches: Dict = {c: {k: 0 for k in kinds} for c in configs}
    sequences = find_sequences(data_root)
    for seq in sequences:
        frames, gts = load_sequence(seq)
        for c, cfg in cfgs.items():
            for kind in kinds:
                res = score_perturbed(cfg, frames, gts, kind, seq.name, seed)
                scores[c][kind][seq.name] = float(res["JF"])
                switches[c][kind] += int(res["id_switches"])
    return {"sequences": [s.name for s in sequences], "kinds": list(kinds), "row": row, "seed": seed,
            "scores": scores, "id_switches": switches}


def format_perturbations(result: Dict) -> str:
    seqs, kinds = result["sequences"], result["kinds"]
    lines = []
    for c, per_kind in result["scores"].items():
        lines.append(f"{c} ({result['row']} row): J&F per perturbation and sequence")
        head = f"{'perturbation':12s} " + " ".join(f"{s[:10]:>10s}" for s in seqs) + "     mean  vs clean  IDsw"
        lines += [head, "-" * len(head)]
        clean = np.mean(list(per_kind["clean"].values())) if "clean" in per_kind else None
        for kind in kinds:
            row = per_kind[kind]
            mean = float(np.mean([row[s] for s in seqs]))
            delta = f"{mean - clean:+9.3f}" if clean is not None else " " * 9
            lines.append(f"{kind:12s} " + " ".join(f"{row[s]:10.3f}" for s in seqs)
                         + f" {mean:8.3f} {delta} {result['id_switches'][c][kind]:5d}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir", help="a folder of sequences with annotations (DAVIS layout)")
    ap.add_argument("--config", action="append", required=True,
                    help="a pipeline config (YAML); repeat to compare several")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--row", default="full", help="ablation row to run (default: full)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise and the dropped frames")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run_perturbations(args.data_dir, args.config, args.kinds, args.row, args.seed)
    print(json.dumps(result) if args.json else format_perturbations(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
