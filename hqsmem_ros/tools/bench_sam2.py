"""SAM 2.1: the package's own video predictor against the streaming HQ-SMem tracker, over a long
stream (issue "SAM2 as a base tracker": memory over 10,000 frames, latency, objects batched).

Both run the same network (random weights unless --checkpoint: speed and memory need no
trained weights) on the same synthetic frames, fed one at a time:

- SAM2's predictor: `init_state` on a one-frame folder, then its frame source replaced by the
  stream (so the frames themselves are not what grows), masks added on frame 0, then
  `propagate_in_video`. Its state keeps every frame's outputs.
- This tracker: HQSMemPipeline with tracker `sam2`, smart memory on, HQ refinement and teacher
  forcing off (the issue's comparison), so the step is the tracker plus the memory policy.

Printed at every `--every` frames: time per frame (median of the window), the bytes of tensors
each side holds in its state (walked, shared tensors counted once) and, on CUDA, allocated GPU
memory. Then the growth from frame `--reference` (500) to the last, the latency ratio, and this
tracker's 5-object step against its 1-object step.

    python -m hqsmem_ros.tools.bench_sam2 --model tiny --frames 10000 --device cuda --precision bf16
    python -m hqsmem_ros.tools.bench_sam2 --model tiny --image-size 128 --frames 600 --every 100   # CPU smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__":  # before tqdm is imported: no per-frame progress bars of the predictor
    os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def tensor_bytes(root: Any) -> int:
    """Bytes of all tensors reachable from `root` through dicts, lists, tuples, sets, dataclasses
    and object attributes; each tensor storage counted once. Modules (the network) are skipped."""
    seen_obj, seen_storage = set(), set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_obj or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.nn.Module)):
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                continue
            key = (obj.untyped_storage().data_ptr(), obj.device.type)
            if key not in seen_storage:
                seen_storage.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, np.ndarray):
            total += obj.nbytes
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


def synthetic_stream(n_objects: int, size: Tuple[int, int], cycle: int = 40, seed: int = 0):
    """`cycle` RGB frames (W, H = size) of coloured blocks moving over a noisy gradient, played
    back and forth, and the first frame's label map (ids 1..n_objects)."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = np.zeros((h, w, 3), np.int64)
    base[..., 0] = np.linspace(0, 200, w)[None].astype(np.int64)
    base[..., 2] = 60
    colours = rng.integers(40, 255, (n_objects, 3))
    bw, bh = max(4, w // (2 * n_objects + 2)), max(4, h // 4)
    frames, label0 = [], None
    for t in range(cycle):
        img = base + rng.integers(0, 30, base.shape)
        lab = np.zeros((h, w), np.uint8)
        for i in range(n_objects):
            x0 = int((i * 2 + 1) * bw + (t % 10) * max(1, bw // 10))
            y0 = int(h // 4 + (i % 2) * h // 4 + t % 5)
            img[y0:y0 + bh, x0:x0 + bw] = colours[i]
            lab[y0:y0 + bh, x0:x0 + bw] = i + 1
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        if t == 0:
            label0 = lab
    order = list(range(cycle)) + list(range(cycle - 2, 0, -1))
    return [frames[k] for k in order], label0


class _StreamFrames:
    """Stands in for the predictor's preloaded frames: frame i of the stream, on demand, in the
    predictor's own input form (resize, /255, ImageNet mean/std), none of them kept."""

    def __init__(self, frames: Sequence[np.ndarray], n: int, image_size: int, device):
        mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
        std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
        self._cycle = []
        for f in frames:
            img = np.asarray(Image.fromarray(f).resize((image_size, image_size))) / 255.0
            t = torch.from_numpy(img).permute(2, 0, 1).float()
            self._cycle.append(((t - mean) / std).to(device))
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._cycle[i % len(self._cycle)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_mb(device: torch.device) -> Optional[float]:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def run_predictor(net, frames, label0, n_frames: int, every: int, device, amp_dtype,
                  on_frame: Callable[[int], None] = lambda t: None) -> List[Dict]:
    """SAM2VideoPredictor over the stream; one record per `every` frames."""
    ids = [int(i) for i in np.unique(label0) if i]
    records, window = [], []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(), \
            torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        Image.fromarray(frames[0]).save(Path(tmp) / "00000.jpg")
        state = net.init_state(tmp)
        state["images"] = _StreamFrames(frames, n_frames, net.image_size, device)
        state["num_frames"] = n_frames
        for oid in ids:
            net.add_new_mask(state, 0, oid, label0 == oid)
        _sync(device)
        t0 = time.perf_counter()
        for f, _, _ in net.propagate_in_video(state):
            _sync(device)
            now = time.perf_counter()
            window.append(now - t0)
            on_frame(f)
            if (f + 1) % every == 0 or f + 1 == n_frames:
                records.append({"frame": f + 1, "ms": 1000 * statistics.median(window),
                                "state_mb": tensor_bytes(state) / 2**20, "cuda_mb": _cuda_mb(device)})
                window = []
            t0 = time.perf_counter()
    return records


def build_pipeline(args, n_objects: int):
    from hqsmem_ros.core.config import PipelineConfig
    from hqsmem_ros.core.pipeline import HQSMemPipeline
    tracker = {"type": "sam2", "model": args.model, "seed": args.seed}
    if args.checkpoint:
        tracker["checkpoint"] = args.checkpoint
    else:
        tracker["random_weights"] = True
    if args.image_size:
        tracker["image_size"] = args.image_size
    if getattr(args, "separate_passes", False):
        tracker["batch_mixed_layouts"] = False
    cfg = PipelineConfig.from_dict({
        "ablation": "full", "refine": "off", "teacher_forcing": False, "smart_memory": True,
        "device": args.device, "precision": args.precision, "process_max_side": 0,
        "memory_capacity": args.capacity, "memory_interval": args.interval,
        "tracker": tracker, "features": {"type": args.features}})
    return HQSMemPipeline(cfg)


def run_ours(pipe, frames, label0, n_frames: int, every: int, device, staggered: bool = False) -> List[Dict]:
    """The streaming tracker in the pipeline; one record per `every` frames. `staggered`: object
    i is prompted on frame i (its first-frame mask) instead of all on frame 0. No StreamSession:
    one synthetic stream of one size, no stamps, ids from its first label image, none removed."""
    from hqsmem_ros.core.pipeline import ObjectPrompt
    ids = [int(i) for i in np.unique(label0) if i]
    due = {k: [ObjectPrompt(oid, mask=label0 == oid)] for k, oid in enumerate(ids)} if staggered \
        else {0: [ObjectPrompt(oid, mask=label0 == oid) for oid in ids]}
    records, window = [], []
    for t in range(n_frames):
        _sync(device)
        t0 = time.perf_counter()
        pipe.process(frames[t % len(frames)], prompts=due.get(t))
        _sync(device)
        if t > max(due):  # prompt frames are the predictor's add_new_mask, not timed there
            window.append(time.perf_counter() - t0)
        if (t + 1) % every == 0 or t + 1 == n_frames:
            records.append({"frame": t + 1, "ms": 1000 * statistics.median(window or [0.0]),
                            "state_mb": tensor_bytes(pipe.tracker) / 2**20, "cuda_mb": _cuda_mb(device),
                            "memory_frames": len(pipe.tracker.memory_frames())})
            window = []
    return records


def step_ms(args, n_objects: int, frames_n: int, staggered: bool = False) -> Tuple[float, List[List[int]]]:
    """Median time per frame of this tracker with n objects (after the prompt frames), and its
    forward passes (object ids per pass) on the last frame."""
    frames, label0 = synthetic_stream(n_objects, args.size, seed=args.seed)
    pipe = build_pipeline(args, n_objects)
    rec = run_ours(pipe, frames, label0, frames_n, frames_n, pipe.tracker.device, staggered)
    return rec[-1]["ms"], list(pipe.tracker.last_batches)


def _growth(records: List[Dict], key: str, reference: int) -> Optional[float]:
    ref = [r for r in records if r["frame"] >= reference and r.get(key) is not None]
    if len(ref) < 2 or not ref[0][key]:
        return None
    return 100.0 * (ref[-1][key] - ref[0][key]) / ref[0][key]


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # if tqdm is not imported yet (`hqsmem bench-sam2`)
    ap = argparse.ArgumentParser(prog="hqsmem bench-sam2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, small, base_plus, large (SAM 2.1)")
    ap.add_argument("--checkpoint", help="official SAM 2.1 .pt (default: random weights)")
    ap.add_argument("--frames", type=int, default=10000)
    ap.add_argument("--predictor-frames", type=int, help="frames for SAM2's own predictor (default: --frames)")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--reference", type=int, default=500, help="growth is measured from this frame")
    ap.add_argument("--objects", type=int, default=1, help="objects in the long run")
    ap.add_argument("--batch-frames", type=int, default=30, help="frames for the 1- vs 5-object step")
    ap.add_argument("--size", default="854x480", help="camera frames WxH")
    ap.add_argument("--image-size", type=int, help="SAM2 input size (default: the config's 1024)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--capacity", type=int, default=8, help="smart memory capacity K")
    ap.add_argument("--interval", type=int, default=5, help="memory candidate interval (frames)")
    ap.add_argument("--features", default="histogram", help="smart memory's features (histogram, dino)")
    ap.add_argument("--skip-predictor", action="store_true")
    ap.add_argument("--separate-passes", action="store_true",
                    help="objects with different memory layouts in separate passes (batch_mixed_layouts: false)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.precision == "fp16" and not args.skip_predictor:
        ap.error("--precision fp16: SAM2's own video predictor keeps its memory in bfloat16, which fp16 "
                 "autocast cannot concatenate (\"Unexpected floating ScalarType\" at its first memory read); "
                 "use bf16, or add --skip-predictor to measure only this tracker in fp16")
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    warnings.filterwarnings("ignore", message="cannot import name '_C'")  # optional CUDA kernel

    from hqsmem_ros.models.checkpoints import resolve_device
    from hqsmem_ros.models.sam2_tracker import build_model
    device = resolve_device(args.device)
    args.device = str(device)
    amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    frames, label0 = synthetic_stream(args.objects, args.size, seed=args.seed)
    report: Dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "device": str(device)}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)

    if not args.skip_predictor:
        net = build_model(args.model, args.image_size, args.seed).to(device).eval()
        if args.checkpoint:
            from ..models.checkpoints import apply_state_dict, load_state_dict
            apply_state_dict(net, load_state_dict(args.checkpoint, f"sam2 {args.model}"), args.checkpoint,
                             f"sam2 {args.model}")
        report["predictor"] = run_predictor(net, frames, label0, args.predictor_frames or args.frames, args.every,
                                            device, amp)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    pipe = build_pipeline(args, args.objects)
    report["ours"] = run_ours(pipe, frames, label0, args.frames, args.every, device)
    del pipe
    report["step_1_object_ms"], _ = step_ms(args, 1, args.batch_frames)
    report["step_5_objects_ms"], report["passes_5_objects"] = step_ms(args, 5, args.batch_frames)
    report["step_5_staggered_ms"], report["passes_5_staggered"] = step_ms(args, 5, args.batch_frames, True)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def format_report(r: Dict) -> str:
    a = r["args"]
    lines = [f"SAM 2.1 {a['model']} ({'checkpoint' if a['checkpoint'] else 'random weights'}), "
             f"{a['size'][0]}x{a['size'][1]} frames, SAM2 input {a['image_size'] or 'config (1024)'}, "
             f"{a['objects']} object(s), {a['frames']} frames, device {r['device']}"
             f"{' (' + r['gpu'] + ')' if r.get('gpu') else ''}, {a['precision']}; this tracker: smart "
             f"memory K={a['capacity']}, interval {a['interval']}, refinement off"]
    cuda = r["device"].startswith("cuda")
    head = "  frame | predictor ms  state MB" + ("  GPU MB" if cuda else "") + \
           " | ours ms  state MB" + ("  GPU MB" if cuda else "") + "  memory frames"
    lines.append(head)
    pred = {p["frame"]: p for p in r.get("predictor", [])}
    for o in r["ours"]:
        p = pred.get(o["frame"])
        left = (f"{p['ms']:12.2f} {p['state_mb']:9.2f}" + (f" {p['cuda_mb']:8.1f}" if cuda else "")) if p else \
            " " * (22 + (9 if cuda else 0))
        lines.append(f"  {o['frame']:5d} | {left} | {o['ms']:7.2f} {o['state_mb']:9.2f}"
                     + (f" {o['cuda_mb']:8.1f}" if cuda else "") + f"  {o['memory_frames']:13d}")
    ref = a["reference"]
    for name, recs in (("predictor", r.get("predictor")), ("ours", r["ours"])):
        if not recs:
            continue
        g_state = _growth(recs, "state_mb", ref)
        g_cuda = _growth(recs, "cuda_mb", ref) if cuda else None
        lines.append(f"  {name}: state growth from frame {ref} to {recs[-1]['frame']}: "
                     + (f"{g_state:+.2f} %" if g_state is not None else "n/a")
                     + (f"; GPU memory {g_cuda:+.2f} %" if g_cuda is not None else ""))
    if r.get("predictor"):
        ours_ms = statistics.median(o["ms"] for o in r["ours"])
        pred_ms = statistics.median(p["ms"] for p in r["predictor"])
        lines.append(f"  per-frame latency, median of the windows: ours {ours_ms:.2f} ms, predictor "
                     f"{pred_ms:.2f} ms, ratio {ours_ms / pred_ms:.2f} (target <= 1.10)")
    one = r["step_1_object_ms"]
    lines.append(f"  this tracker's step: 1 object {one:.2f} ms; 5 objects prompted together "
                 f"{r['step_5_objects_ms']:.2f} ms (ratio {r['step_5_objects_ms'] / one:.2f}, "
                 f"{len(r['passes_5_objects'])} pass); prompted on 5 different frames "
                 f"{r['step_5_staggered_ms']:.2f} ms (ratio {r['step_5_staggered_ms'] / one:.2f}, "
                 f"{len(r['passes_5_staggered'])} pass) (target <= 2)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
