"""Per-stage latency of the neural refiner and verifier (random weights: speed needs no weights).

`bench_neural` times, per frame: the SAM-HQ image encoder (`set_image`), the batched decoder
for all objects' boxes (`propose_torch`: 3 proposals per object, upsampled and thresholded on
the device), the DINO forward pass (`set_image`) and the batched masked pooling of the
N x 3 proposals plus the N coarse masks (`embed_torch`). On CUDA every stage is bracketed by
`torch.cuda.synchronize()` so that the times are the GPU's, and the peak allocated GPU memory
is reported. Medians over `iters` frames after `warmup` frames.

    python -m hqsmem_ros.tools.bench_models --size 854x480 --objects 5 --device cuda --precision fp16

`bench_dino_resampling` (``--dino-compare``) times the DINO feature step (set_image + pooling of
4 masks per object) with the official position-embedding resampling and exact patch weights
against the previous code path (timm's own resampling, adaptive average pooling), alternating
the two on the same frames in one run, and prints the ratio.

`bench_sam_hq_precision` (``--sam-precision``) times the SAM-HQ refine step (`set_image` +
`propose_torch` for all boxes; and the decoder step `propose_torch` alone; median and fastest
frame) in fp32, in the low precision (bf16, or fp16: on the CPU only with HQSMEM_CPU_FP16=1,
emulated, slow) as shipped (prompt encoder and token path in float32), and in the low precision
as before that change (both under autocast;
`precision_stages.as_before_float32_token_path`), alternating the three on the same frames and
weights in one run:

    python -m hqsmem_ros.tools.bench_models --sam-precision --size 854x480 --objects 5 --device cpu --iters 9 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, Tuple

import numpy as np
import torch

from hqsmem_ros.models.checkpoints import resolve_device


def _boxes(n: int, width: int, height: int, rng) -> np.ndarray:
    w = rng.uniform(0.1, 0.4, n) * width
    h = rng.uniform(0.1, 0.4, n) * height
    x0 = rng.uniform(0, width - w)
    y0 = rng.uniform(0, height - h)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def bench_neural(size: Tuple[int, int] = (854, 480), n_objects: int = 5, device: str = "auto",
                 precision: str = "fp32", iters: int = 10, warmup: int = 2, sam_model_type: str = "vit_tiny",
                 dino_model: str = "dinov2_vits14", dino_input_size: int = 448, seed: int = 0) -> Dict:
    """Median milliseconds per stage (and peak GPU memory on CUDA) for one frame of `size` (W, H)."""
    from hqsmem_ros.models.dino import DinoFeatureExtractor
    from hqsmem_ros.models.sam_hq import SamHQRefiner

    width, height = int(size[0]), int(size[1])
    if n_objects < 1 or iters < 1 or warmup < 0:
        raise ValueError("n_objects and iters must be >= 1, warmup >= 0")
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    refiner = SamHQRefiner.from_config({"model_type": sam_model_type, "random_weights": True, "seed": seed},
                                       device=str(dev), precision=precision)
    features = DinoFeatureExtractor.from_config(
        {"model_name": dino_model, "random_weights": True, "input_size": dino_input_size, "seed": seed},
        device=str(dev), precision=precision)
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
    boxes = _boxes(n_objects, width, height, rng)
    coarse = np.zeros((n_objects, height, width), bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        coarse[k, y0:y1, x0:x1] = True
    coarse_t = torch.from_numpy(coarse).to(dev)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    stages = ("sam_encoder", "sam_decoder", "dino_forward", "dino_embed")
    times: Dict[str, list] = {s: [] for s in stages}
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(warmup + iters):
        image = frames[i % 2]
        lap = {}
        sync()
        t = time.perf_counter()
        refiner.set_image(image)
        sync()
        lap["sam_encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        props, _scores = refiner.propose_torch(boxes)
        sync()
        lap["sam_decoder"] = time.perf_counter() - t
        t = time.perf_counter()
        features.set_image(image)
        sync()
        lap["dino_forward"] = time.perf_counter() - t
        t = time.perf_counter()
        features.embed_torch(torch.cat([coarse_t, props.flatten(0, 1)]))
        sync()
        lap["dino_embed"] = time.perf_counter() - t
        if i >= warmup:
            for s in stages:
                times[s].append(lap[s])
    result = {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "precision": precision,
        "size": f"{width}x{height}",
        "objects": n_objects,
        "iters": iters,
        "sam_model_type": sam_model_type,
        "dino_model": dino_model,
        "dino_input_size": dino_input_size,
        "dino_grid": list(features.token_map.shape[:2]),
        "torch": torch.__version__,
    }
    for s in stages:
        result[f"{s}_ms"] = round(1000 * statistics.median(times[s]), 2)
    result["total_ms"] = round(sum(result[f"{s}_ms"] for s in stages), 2)
    result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if cuda else None
    return result


def bench_dino_resampling(size: Tuple[int, int] = (854, 480), n_objects: int = 5, device: str = "cpu",
                          iters: int = 10, warmup: int = 2, dino_model: str = "dinov2_vits14",
                          dino_input_size: int = 448, seed: int = 0) -> Dict:
    """Median ms of the feature step, official resampling vs the previous timm path, same run."""
    import torch.nn.functional as F

    from ..models.dino import DinoFeatureExtractor

    class _Previous(DinoFeatureExtractor):
        """The code before the official resampling: timm's forward, adaptive average pooling."""

        def forward_tokens(self, x):
            return self.model.forward_features(x)

        def pool_weights(self, masks):
            m = masks.to(self.device).float().unsqueeze(1)
            return F.adaptive_avg_pool2d(m, tuple(self._tokens.shape[:2])).flatten(1)

    width, height = int(size[0]), int(size[1])
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    now = DinoFeatureExtractor.from_config(
        {"model_name": dino_model, "random_weights": True, "input_size": dino_input_size, "seed": seed},
        device=str(dev))
    before = _Previous(now.model, input_size=dino_input_size, device=dev, model_name=dino_model)
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
    masks = np.zeros((4 * n_objects, height, width), bool)
    for k, (x0, y0, x1, y1) in enumerate(_boxes(4 * n_objects, width, height, rng).astype(int)):
        masks[k, y0:y1, x0:x1] = True
    masks_t = torch.from_numpy(masks).to(dev)
    times = {"official": [], "previous": []}
    for i in range(warmup + iters):
        image = frames[i % 2]
        order = (("official", now), ("previous", before)) if i % 2 == 0 else (("previous", before), ("official", now))
        for name, f in order:
            if cuda:
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            f.set_image(image)
            f.embed_torch(masks_t)
            if cuda:
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    official = 1000 * statistics.median(times["official"])
    previous = 1000 * statistics.median(times["previous"])
    return {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "size": f"{width}x{height}",
            "dino_model": dino_model, "dino_input_size": dino_input_size, "masks": 4 * n_objects,
            "dino_grid": list(now.token_map.shape[:2]), "iters": iters, "threads": torch.get_num_threads(),
            "official_ms": round(official, 2), "previous_ms": round(previous, 2),
            "official_over_previous": round(official / previous, 4)}


def bench_sam_hq_precision(size: Tuple[int, int] = (854, 480), n_objects: int = 5, device: str = "cpu",
                           low: str = "bf16", iters: int = 5, warmup: int = 1, sam_model_type: str = "vit_tiny",
                           seed: int = 0) -> Dict:
    """Median ms of the refine step: fp32, `low` as shipped, `low` with the token path under autocast."""
    import copy

    from hqsmem_ros.models.sam_hq import SamHQRefiner
    from hqsmem_ros.tools.precision_stages import as_before_float32_token_path

    width, height = int(size[0]), int(size[1])
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    fp32 = SamHQRefiner.from_config({"model_type": sam_model_type, "random_weights": True, "seed": seed},
                                    device=str(dev), precision="fp32")
    shipped = SamHQRefiner(fp32.model, dev, low)  # the same weights; the wrappers are no-ops in fp32
    previous = as_before_float32_token_path(SamHQRefiner(copy.deepcopy(fp32.model), dev, low))
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
    boxes = _boxes(n_objects, width, height, rng)
    runs = [("fp32", fp32), (low, shipped), (f"{low}_before", previous)]
    times: Dict[str, Dict[str, list]] = {name: {"refine": [], "decode": []} for name, _ in runs}

    def lap(start):
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    for i in range(warmup + iters):
        for name, refiner in runs[i % 3:] + runs[:i % 3]:  # rotate the order every frame
            lap(0.0)
            t = time.perf_counter()
            refiner.set_image(frames[i % 2])
            encode = lap(t)
            t = time.perf_counter()
            refiner.propose_torch(boxes)
            decode = lap(t)
            if i >= warmup:
                times[name]["refine"].append(encode + decode)
                times[name]["decode"].append(decode)
    result = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "size": f"{width}x{height}",
              "objects": n_objects, "sam_model_type": sam_model_type, "iters": iters,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    for step in ("refine", "decode"):
        for stat, pick in (("median", statistics.median), ("min", min)):  # min: less hit by other load
            ms = {name: 1000 * pick(t[step]) for name, t in times.items()}
            result.update({f"{name}_{step}_{stat}_ms": round(v, 1) for name, v in ms.items()})
            result[f"{step}_{stat}_{low}_over_fp32"] = round(ms[low] / ms["fp32"], 4)
            result[f"{step}_{stat}_{low}_over_before"] = round(ms[low] / ms[f"{low}_before"], 4)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="854x480", help="WxH")
    ap.add_argument("--objects", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sam", default="vit_tiny", choices=("vit_tiny", "vit_b", "vit_l", "vit_h"))
    ap.add_argument("--dino", default="dinov2_vits14")
    ap.add_argument("--dino-input", type=int, default=448)
    ap.add_argument("--dino-compare", action="store_true",
                    help="time only the DINO feature step: official resampling vs the previous timm path")
    ap.add_argument("--sam-precision", action="store_true",
                    help="time only the SAM-HQ refine step: fp32 against --low (as shipped and as before "
                         "the float32 token path)")
    ap.add_argument("--low", default="bf16", choices=("bf16", "fp16"), help="low precision for --sam-precision")
    a = ap.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    if a.sam_precision:
        print(json.dumps(bench_sam_hq_precision((w, h), a.objects, a.device, a.low, a.iters, a.warmup, a.sam)))
        return
    if a.dino_compare:
        print(json.dumps(bench_dino_resampling((w, h), a.objects, a.device, a.iters, a.warmup, a.dino, a.dino_input)))
        return
    print(json.dumps(bench_neural((w, h), a.objects, a.device, a.precision, a.iters, a.warmup,
                                  a.sam, a.dino, a.dino_input)))


if __name__ == "__main__":
    main()
