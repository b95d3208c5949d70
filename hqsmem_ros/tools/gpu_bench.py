"""The GPU figures of the neural path in one run (issue 14, "Must reach"), written to one JSON and
one markdown table. Run through scripts/gpu_bench.sh, which installs what is missing first.

Stages, each in the existing bench code (no new timing loops here), each recorded even when
another fails:
1. dino: the DINO feature step with the official position-embedding resampling against the
   previous timm path, same run (bench_models.bench_dino_resampling), on the GPU and the CPU.
2. hqsmem_step: full HQ-SMem (config/paper_models.yaml: R50-DeAOT-L + SAM-HQ vit_tiny + DINOv2
   ViT-S/14, 3 proposals per object), 1280x720, 5 objects, random weights, then the base tracker
   alone on the same frames (bench.run_bench): ms per frame and the ratio.
3. hqsmem_memory: the same full pipeline over --memory-frames (3,000) frames, allocated GPU
   memory at frame 500 and at the last; the base tracker's own memory over --base-frames.
4. sam2: SAM 2.1 tiny streaming (bench_sam2), 1 object: this tracker and SAM2's own predictor
   over --sam2-latency-frames (800) each, latency ratio, the predictor's memory growth from
   frame 500; the 5-object step against the 1-object step.
5. sam2_memory: this tracker alone over --sam2-frames (10,000), memory at frame 500 and the last.

The two long memory runs (hqsmem_memory, sam2_memory) run at the same time, sam2_memory in a
child process: allocated GPU memory is per process, so neither figure is affected, and the run
fits in about 8 minutes. Their ms/frame are therefore not latency figures; the latency figures
come from stages 1, 2 and 4, which run alone.

--dry runs every stage on the CPU at tiny sizes (a few frames), to check the script end to end
where there is no GPU; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
PAPER_PROFILE = ROOT / "config" / "paper_models.yaml"


def _pct(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else round(100.0 * (a - b) / b, 2)


def _stage(report: Dict, name: str, fn: Callable[[], Dict]) -> None:
    t = time.perf_counter()
    try:
        report["stages"][name] = fn()
    except Exception as exc:  # one failing stage must not lose the others' figures
        report["stages"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    report["stages"][name]["wall_s"] = round(time.perf_counter() - t, 1)
    print(f"[gpu_bench] {name}: {report['stages'][name]['wall_s']} s"
          + (f" FAILED {report['stages'][name]['error']}" if "error" in report["stages"][name] else ""), flush=True)


def stage_dino(a) -> Dict:
    from .bench_models import bench_dino_resampling

    out = {}
    for dev in (["cpu"] if a.dry else ["cuda", "cpu"]):
        out[dev] = bench_dino_resampling(a.dino_size, 5, dev, iters=a.dino_iters, warmup=2 if not a.dry else 1,
                                         dino_input_size=a.dino_input)
    return out


def _paper_config(a):
    from ..core.config import load_config

    cfg = load_config(PAPER_PROFILE)
    if a.dry:  # tiny: DINO at 56 px, DeAOT's input capped
        cfg = cfg.replace(features=dict(cfg.features, input_size=a.dino_input),
                          tracker=dict(cfg.tracker, max_long_edge=128))
    return cfg


def stage_hqsmem_step(a) -> Dict:
    from .bench import run_bench

    r = run_bench(size=a.size, objects=a.objects, frames=a.step_frames, config=_paper_config(a), one_core=False,
                  random_weights=True, device=a.device, precision=a.precision)
    return {"size": r["size"], "objects": r["objects"], "frames": r["frames"], "precision": a.precision,
            "full_ms": round(r["full"]["ms_per_frame"], 2), "base_ms": round(r["base"]["ms_per_frame"], 2),
            "full_over_base": round(r["full_over_base_time"], 3), "full_stage_ms":
            {k: round(v, 2) for k, v in r["full"]["stage_ms"].items()}, "gpu": r["gpu"]}


def stage_hqsmem_memory(a) -> Dict:
    from .bench import run_bench

    ref, last = a.reference, a.memory_frames
    r = run_bench(size=a.size, objects=a.objects, frames=last, config=_paper_config(a), one_core=False,
                  random_weights=True, device=a.device, precision=a.precision, base_frames=a.base_frames,
                  checkpoints=(a.base_reference, ref, a.base_frames, last))
    key = "gpu_mb_at_frame" if not a.dry else "rss_mb_at_frame"  # the CPU dry run has no GPU counter
    full, base = r["full"][key], r["base"][key]
    out = {"counter": "torch.cuda.memory_allocated" if not a.dry else "process RSS (dry run)",
           "full_frames": last, "base_frames": a.base_frames, "full_ms": round(r["full"]["ms_per_frame"], 2),
           "base_ms": round(r["base"]["ms_per_frame"], 2),
           "full_mb_at": {k: round(v, 1) for k, v in full.items()},
           "base_mb_at": {k: round(v, 1) for k, v in base.items()},
           "full_growth_pct": _pct(full.get(str(last)), full.get(str(ref))),
           "base_growth_pct": _pct(base.get(str(a.base_frames)), base.get(str(a.base_reference))),
           "memory_bank_max": r["full"]["memory_bank_max"], "base_memory_frames_final": r["base"]["memory_bank_final"]}
    b0, b1 = base.get(str(a.base_reference)), base.get(str(a.base_frames))
    if b0 is not None and b1 is not None and a.base_frames > a.base_reference:
        out["base_mb_per_frame"] = round((b1 - b0) / (a.base_frames - a.base_reference), 3)
    return out


def _bench_sam2(a, frames: int, predictor: bool, batch_frames: int, tag: str) -> Dict:
    from . import bench_sam2

    path = Path(a.out) / f"{tag}_raw.json"
    argv = ["--model", "tiny", "--frames", str(frames), "--every", str(a.sam2_every),
            "--reference", str(a.reference), "--objects", "1", "--batch-frames", str(batch_frames),
            "--device", a.device, "--precision", a.sam2_precision, "--json", str(path)]
    if not predictor:
        argv.append("--skip-predictor")
    if a.dry:
        argv += ["--image-size", "128", "--size", "160x96"]
    bench_sam2.main(argv)
    return json.loads(path.read_text())


def _at(recs: List[Dict], frame: int, key: str) -> Optional[float]:
    hit = [x[key] for x in recs if x["frame"] == frame]
    return hit[0] if hit else None


def stage_sam2_memory(a) -> Dict:
    r = _bench_sam2(a, a.sam2_frames, False, 3, "sam2_memory")
    key = "cuda_mb" if not a.dry else "state_mb"
    ours = r["ours"]
    first, last = _at(ours, a.reference, key), _at(ours, a.sam2_frames, key)
    return {"counter": "torch.cuda.memory_allocated" if not a.dry else "tensor bytes in the state (dry run)",
            "precision": a.sam2_precision, "ours_frames": a.sam2_frames,
            "ours_mb_at": {str(a.reference): first, str(a.sam2_frames): last},
            "ours_growth_pct": _pct(last, first), "memory_frames_final": ours[-1]["memory_frames"]}


def stage_sam2(a) -> Dict:
    a.predictor_frames = a.sam2_latency_frames
    r = _bench_sam2(a, a.sam2_latency_frames, True, a.batch_frames, "sam2")
    key = "cuda_mb" if not a.dry else "state_mb"
    def at(recs: List[Dict], frame: int) -> Optional[float]:
        hit = [x[key] for x in recs if x["frame"] == frame]
        return hit[0] if hit else None

    ours, pred = r["ours"], r.get("predictor", [])
    import statistics
    ours_ms = statistics.median(x["ms"] for x in ours if x["frame"] > a.reference) if len(ours) > 1 else ours[-1]["ms"]
    pred_ms = statistics.median(x["ms"] for x in pred if x["frame"] > a.reference) if len(pred) > 1 else pred[-1]["ms"]
    return {"counter": "torch.cuda.memory_allocated" if not a.dry else "tensor bytes in the state (dry run)",
            "precision": a.sam2_precision, "ours_frames": a.sam2_latency_frames, "predictor_frames": a.predictor_frames,
            "ours_ms": round(ours_ms, 2), "predictor_ms": round(pred_ms, 2),
            "ours_over_predictor": round(ours_ms / pred_ms, 3),
            "ours_mb_at": {str(a.reference): at(ours, a.reference),
                           str(a.sam2_latency_frames): at(ours, a.sam2_latency_frames)},
            "ours_growth_pct": _pct(at(ours, a.sam2_latency_frames), at(ours, a.reference)),
            "predictor_mb_at": {str(a.reference): at(pred, a.reference),
                                str(a.predictor_frames): at(pred, a.predictor_frames)},
            "predictor_growth_pct": _pct(at(pred, a.predictor_frames), at(pred, a.reference)),
            "step_1_object_ms": round(r["step_1_object_ms"], 2), "step_5_objects_ms": round(r["step_5_objects_ms"], 2),
            "five_over_one": round(r["step_5_objects_ms"] / r["step_1_object_ms"], 3),
            "step_5_staggered_ms": round(r["step_5_staggered_ms"], 2)}


def _fmt(v, unit=""):
    return "n/a" if v is None else f"{v}{unit}"


def _check(value, limit) -> str:
    if value is None:
        return "not measured"
    return "yes" if value <= limit else "NO"


def markdown(report: Dict) -> str:
    s = report["stages"]
    rows = []

    def row(figure, value, target, ok):
        rows.append(f"| {figure} | {value} | {target} | {ok} |")

    st = s.get("hqsmem_step", {})
    if "error" not in st and st:
        row(f"Full HQ-SMem {st['size']}, {st['objects']} objects, {st['precision']}: ms/frame",
            f"{st['full_ms']} (base alone {st['base_ms']})", "<= 33 ms", _check(st["full_ms"], 33))
        row("Full HQ-SMem / base tracker step, same run", st["full_over_base"], "<= 1.6x", _check(st["full_over_base"], 1.6))
    mem = s.get("hqsmem_memory", {})
    if "error" not in mem and mem:
        g = mem["full_growth_pct"]
        row(f"GPU memory, full HQ-SMem, frame {mem['full_frames']} vs {report['args']['reference']}",
            f"{_fmt(g, ' %')} ({mem['full_mb_at']})", "within 2 %",
            "not measured" if g is None else ("yes" if abs(g) <= 2 else "NO"))
        row(f"GPU memory, base tracker's own rule, frame {mem['base_frames']} vs {report['args']['base_reference']}",
            f"{_fmt(mem['base_growth_pct'], ' %')} ({_fmt(mem.get('base_mb_per_frame'), ' MB/frame')})",
            "reported", "-")
    sm = s.get("sam2", {})
    if "error" not in sm and sm:
        row("SAM 2.1 tiny streaming: 5-object / 1-object step",
            f"{sm['five_over_one']} ({sm['step_5_objects_ms']} / {sm['step_1_object_ms']} ms)", "<= 2x",
            _check(sm["five_over_one"], 2))
        row("SAM 2.1 tiny: this tracker / SAM2's predictor latency",
            f"{sm['ours_over_predictor']} ({sm['ours_ms']} / {sm['predictor_ms']} ms)", "<= 1.10",
            _check(sm["ours_over_predictor"], 1.10))
        row(f"SAM2's own predictor: GPU memory frame {sm['predictor_frames']} vs {report['args']['reference']}",
            f"{_fmt(sm['predictor_growth_pct'], ' %')} ({sm['predictor_mb_at']})", "reported", "-")
    sg = s.get("sam2_memory", {})
    if "error" not in sg and sg:
        g = sg["ours_growth_pct"]
        row(f"SAM 2.1 tiny streaming: GPU memory frame {sg['ours_frames']} vs {report['args']['reference']}",
            f"{_fmt(g, ' %')} ({sg['ours_mb_at']})", "within 2 %",
            "not measured" if g is None else ("yes" if abs(g) <= 2 else "NO"))
    dn = s.get("dino", {})
    for dev, d in dn.items():
        if isinstance(d, dict) and "official_over_previous" in d:
            row(f"DINO feature step ({dev}, {d['size']}, {d['dino_model']}@{d['dino_input_size']}): official / previous",
                f"{d['official_over_previous']} ({d['official_ms']} / {d['previous_ms']} ms)", "<= 1.05",
                _check(d["official_over_previous"], 1.05))
    failed = [f"- stage {k} failed: {v['error']}" for k, v in s.items() if isinstance(v, dict) and "error" in v]
    head = (f"GPU bench ({'DRY RUN on the CPU, tiny sizes: figures mean nothing' if report['dry'] else report['device']}), "
            f"torch {report['torch']}, Python {report['python']}, {report['date']}, random weights, "
            f"{report['wall_s']} s in all\n\n| figure | measured | target | reached |\n|---|---|---|---|")
    return "\n".join([head] + rows + ([""] + failed if failed else [])) + "\n"


def _start_child(a, argv, stage: str):
    """`stage` in a child process with the same arguments, its report in OUT/<stage>/."""
    import subprocess

    sub = Path(a.out) / stage
    args = [x for x in (sys.argv[1:] if argv is None else list(argv))]
    cmd = [sys.executable, "-m", "hqsmem_ros.tools.gpu_bench", *args, "--out", str(sub), "--stages", stage]
    print(f"[gpu_bench] {stage}: started beside the next stage (pid follows)", flush=True)
    proc = subprocess.Popen(cmd)
    print(f"[gpu_bench] {stage}: pid {proc.pid}", flush=True)
    return proc, sub


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_bench_out", help="folder for the JSON and table")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes, a few frames: checks the script only")
    ap.add_argument("--stages", default="dino,hqsmem_step,sam2,hqsmem_memory,sam2_memory")
    ap.add_argument("--serial", action="store_true", help="run sam2_memory after hqsmem_memory, not beside it")
    ap.add_argument("--step-frames", type=int, default=150)
    ap.add_argument("--memory-frames", type=int, default=3000)
    ap.add_argument("--base-frames", type=int, default=300)
    ap.add_argument("--base-reference", type=int, default=100)
    ap.add_argument("--reference", type=int, default=500)
    ap.add_argument("--sam2-frames", type=int, default=10000)
    ap.add_argument("--sam2-latency-frames", type=int, default=800)
    ap.add_argument("--sam2-every", type=int, default=500)
    ap.add_argument("--batch-frames", type=int, default=30)
    a = ap.parse_args(argv)
    a.size, a.objects, a.device, a.precision, a.sam2_precision = (1280, 720), 5, "cuda", "fp16", "bf16"
    a.dino_size, a.dino_input, a.dino_iters = (1280, 720), 448, 10
    if a.dry:
        a.size, a.device, a.precision, a.sam2_precision = (96, 64), "cpu", "fp32", "fp32"
        a.dino_size, a.dino_input, a.dino_iters = (160, 96), 56, 2
        a.step_frames, a.memory_frames, a.base_frames, a.base_reference, a.reference = 2, 3, 2, 1, 2
        a.sam2_frames, a.sam2_latency_frames, a.sam2_every, a.batch_frames = 4, 4, 2, 3
    import torch

    if not a.dry and not torch.cuda.is_available():
        print(f"gpu_bench: no CUDA GPU visible to torch {torch.__version__} (use --dry to check the script on "
              "the CPU)", file=sys.stderr)
        return 2
    Path(a.out).mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {
        "dry": a.dry, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.dry else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()}, "stages": {}}
    t0 = time.perf_counter()
    stages = {"dino": stage_dino, "hqsmem_step": stage_hqsmem_step, "hqsmem_memory": stage_hqsmem_memory,
              "sam2": stage_sam2, "sam2_memory": stage_sam2_memory}
    names = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in stages]
    if unknown:
        print(f"gpu_bench: unknown stage {unknown[0]!r}; known: {', '.join(stages)}", file=sys.stderr)
        return 2
    child = None
    if not a.serial and {"hqsmem_memory", "sam2_memory"} <= set(names):
        names.remove("sam2_memory")
        report["concurrent"] = ["hqsmem_memory", "sam2_memory"]
    for name in names:
        if name == "hqsmem_memory" and "concurrent" in report:
            child = _start_child(a, argv, "sam2_memory")
        _stage(report, name, lambda fn=stages[name]: fn(a))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if child is not None:
        proc, sub = child
        rc = proc.wait()
        try:
            report["stages"]["sam2_memory"] = json.loads((sub / "gpu_bench.json").read_text())["stages"]["sam2_memory"]
        except (OSError, ValueError, KeyError) as exc:
            report["stages"]["sam2_memory"] = {"error": f"child process (exit {rc}) left no result: {exc}"}
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    (Path(a.out) / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (Path(a.out) / "gpu_bench.md").write_text(table)
    print(table)
    return 1 if any("error" in v for v in report["stages"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
