"""`hqsmem bench`: frames/s, per-stage time and memory of the pipeline on synthetic frames.

The full configuration and the base tracker alone run in the same process on the same frames,
so their ratio is meaningful on a noisy machine. Frame generation is outside the timed region.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, Optional

import numpy as np
import psutil

from hqsmem_ros.core.config import load_config
from hqsmem_ros.core.pipeline import HQSMemPipeline, ObjectPrompt


def _pin_one_core() -> Optional[int]:
    import cv2

    cv2.setNumThreads(1)
    import sys
    if "torch" in sys.modules:  # only when a configured model brought it in
        sys.modules["torch"].set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return core
    return None


def _run(cfg, frames_iter, n_frames: int, checkpoints=(1000, 10000)) -> Dict:
    # No StreamSession: synthetic frames of one size, no stamps, ids from the first label image.
    pipeline = HQSMemPipeline(cfg)
    proc = psutil.Process()
    stages: Dict[str, float] = {}
    total = 0.0
    memory_sizes = []
    rss_at = {}
    gpu_at = {}
    peak_rss = proc.memory_info().rss
    # Per-frame series for plots (eval/plots.py plot_memory), about 200 samples, outside the timing.
    series = {"frame": [], "memory_bank": [], "memory_mb": [], "rss_mb": [], "gpu_mb": []}
    step = max(1, n_frames // 200)
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available()
    for k, (image, label) in enumerate(frames_iter):
        prompts = None
        if k == 0:
            prompts = [ObjectPrompt(int(i), mask=label == i) for i in np.unique(label) if i != 0]
        t0 = time.perf_counter()
        result = pipeline.process(image, prompts=prompts)
        total += time.perf_counter() - t0
        if k > 0:  # the prompt frame is set-up, not steady state
            for name, sec in result.timings.items():
                stages[name] = stages.get(name, 0.0) + sec
        memory_sizes.append(len(result.memory_frames))
        if k % step == 0 or k + 1 == n_frames:
            series["frame"].append(k + 1)
            series["memory_bank"].append(len(result.memory_frames))
            series["memory_mb"].append(pipeline.tracker.memory_bytes() / 2**20)
            series["rss_mb"].append(proc.memory_info().rss / 2**20)
            if cuda:
                series["gpu_mb"].append(torch.cuda.memory_allocated() / 2**20)
        if (k + 1) % 100 == 0 or k + 1 in checkpoints or k + 1 == n_frames:
            rss = proc.memory_info().rss
            peak_rss = max(peak_rss, rss)
            if k + 1 in checkpoints:
                rss_at[k + 1] = rss
                if cuda:
                    gpu_at[k + 1] = torch.cuda.memory_allocated() / 2**20
    steady = max(1, n_frames - 1)
    per_stage_ms = {k: 1000 * v / steady for k, v in stages.items()}
    return {
        "fps": steady / max(1e-9, stages.get("total", total)),
        "ms_per_frame": per_stage_ms.get("total", 0.0),
        "stage_ms": per_stage_ms,
        "peak_rss_mb": peak_rss / 2**20,
        "rss_mb_at_frame": {str(k): v / 2**20 for k, v in rss_at.items()},
        "gpu_mb_at_frame": {str(k): v for k, v in gpu_at.items()},
        "memory_bank_max": int(max(memory_sizes)),
        "memory_bank_final": int(memory_sizes[-1]),
        "memory_bank_over_frames": memory_sizes[:: max(1, len(memory_sizes) // 50)],
        "series": {k: v for k, v in series.items() if v},
        "stats": {k: v for k, v in pipeline.stats().items() if k != "memory_frames"},
    }


NEURAL_TYPES = {"deaot", "sam2", "sam_hq", "dino"}


def with_random_weights(cfg):
    """The config with every neural component switched to random weights (speed needs none)."""
    d = cfg.to_dict()
    for key in ("tracker", "refiner", "features"):
        if d[key]["type"] in NEURAL_TYPES:
            d[key] = {k: v for k, v in d[key].items() if k not in ("checkpoint", "sha256")}
            d[key]["random_weights"] = True
    return load_config(d)


def run_bench(size=(640, 480), objects: int = 3, frames: int = 300, config=None,
              one_core: bool = True, seed: int = 0, random_weights: bool = False,
              device: Optional[str] = None, precision: Optional[str] = None,
              base_frames: Optional[int] = None, checkpoints=(1000, 10000)) -> Dict:
    """Full pipeline, then the base tracker alone (over `base_frames`, default `frames`), on the
    same synthetic stream; RSS (and allocated GPU memory on CUDA) recorded at `checkpoints`."""
    from hqsmem_ros.data.synth import iter_frames

    core = _pin_one_core() if one_core else None
    cfg = load_config(config)
    if device or precision:
        cfg = cfg.replace(**{k: v for k, v in (("device", device), ("precision", precision)) if v})
    if random_weights:
        cfg = with_random_weights(cfg)
    base_cfg = cfg.replace(ablation="base", refine=None, teacher_forcing=None, smart_memory=None)

    base_frames = frames if base_frames is None else int(base_frames)

    def stream(n=frames):
        return iter_frames(seed=seed, size=tuple(size), frames=n, n_objects=objects)

    # Full first: RSS never shrinks, so the base rule's growth would otherwise hide whether the
    # full pipeline's memory stays flat.
    full = _run(cfg, stream(), frames, checkpoints)
    base = _run(base_cfg, stream(base_frames), base_frames, checkpoints)
    gpu = {}
    import sys
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        torch = sys.modules["torch"]
        gpu = {"device": torch.cuda.get_device_name(0),
               "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {
        "size": f"{size[0]}x{size[1]}",
        "random_weights": random_weights,
        "gpu": gpu,
        "objects": objects,
        "frames": frames,
        "base_frames": base_frames,
        "pinned_core": core,
        "config": {k: v for k, v in cfg.to_dict().items()},
        "fps": full["fps"],
        "base_fps": base["fps"],
        "full_over_base_time": full["ms_per_frame"] / max(1e-9, base["ms_per_frame"]),
        "full": full,
        "base": base,
    }


def format_report(r: Dict) -> str:
    f, b = r["full"], r["base"]
    lines = [
        f"hqsmem bench: {r['size']}, {r['objects']} objects, {r['frames']} frames, "
        f"core {'pinned to CPU %s' % r['pinned_core'] if r['pinned_core'] is not None else 'not pinned'}",
        f"  full ({r['config']['ablation']}): {f['fps']:.1f} frames/s ({f['ms_per_frame']:.2f} ms/frame)",
        f"  base tracker alone:  {b['fps']:.1f} frames/s ({b['ms_per_frame']:.2f} ms/frame)",
        f"  full / base time per frame: {r['full_over_base_time']:.2f}x",
        "  per-stage ms (full): " + ", ".join(f"{k} {v:.2f}" for k, v in f["stage_ms"].items()),
        f"  memory bank: max {f['memory_bank_max']} (capacity {f['stats']['memory_capacity']}), "
        f"base's own rule: {b['memory_bank_final']} at the end",
        f"  peak RSS: full {f['peak_rss_mb']:.0f} MB, base {b['peak_rss_mb']:.0f} MB",
    ]
    if f["rss_mb_at_frame"]:
        lines.append("  RSS at frame: " + ", ".join(f"{k}: {v:.1f} MB" for k, v in f["rss_mb_at_frame"].items()))
    return "\n".join(lines)
