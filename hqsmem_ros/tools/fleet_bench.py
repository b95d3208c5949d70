"""Benchmark of `hqsmem bags`: throughput of 1 vs N local workers and of Ray, in one run.

  python -m hqsmem_ros.tools.fleet_bench --bags 8 --frames 300 --size 640x480 --workers 1 2 [--no-ray]
      [--neural-config config/paper_models.yaml] [--json]

Writes one synthetic camera bag (hqsmem_ros.tools.synth_bag) and hard-links it into --bags bag
folders with their prompts files, then runs `hqsmem bags` (hqsmem_ros.fleet.run_bags) over all of
them with each --workers count on the local pool and, when Ray is installed, with the largest
count on a local Ray instance (ray.init(num_cpus=N)), each into a fresh output folder that is
removed afterwards. Prints frames/s over all bags (frames in / time from the first bag handed
out to the last result), the ratios between the runs, the scheduling overhead per bag (a bag's
round trip from the parent minus process_bag's own run: opening, pipeline set-up, manifest,
rename, result), each worker's model-load time and when the last worker was ready (workers
start in parallel with the first bags; with few, short bags that start-up weighs on the figure). With --neural-config it also builds that
config's models (random weights, CPU) in this process: cold (imports and first construction),
again (what a per-bag rebuild would cost), a worker's one build (WorkerState.load) and the reset
of that pipeline that each further bag costs (process_bag(pipeline=...)).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List


def make_bags(root: Path, n: int, frames: int, size, storage: str, image_format: str) -> Path:
    from hqsmem_ros.tools.synth_bag import write_synthetic_bag

    src = root / "source"
    info = write_synthetic_bag(src, frames=frames, size=size, storage=storage, image_format=image_format,
                               seed=0, prompts="file")
    bags = root / "bags"
    bags.mkdir()
    shutil.copy(src.with_name("source.prompt0.png"), bags / "source.prompt0.png")
    for k in range(n):
        name = f"bag{k:02d}"
        (bags / name).mkdir()
        for f in src.iterdir():
            os.link(f, bags / name / f.name)  # the same frames, no extra disk
        shutil.copy(info["prompts_file"], bags / f"{name}.prompts.yaml")
    return bags


def run_once(bags: Path, out: Path, workers: int, ray_address=None) -> Dict[str, Any]:
    from hqsmem_ros.fleet import run_bags

    report = run_bags([bags], out, prompts_dir=bags, workers=workers, ray_address=ray_address,
                      progress=False, log=lambda text: None)
    if not report["totals"]["all_ok"]:
        raise SystemExit("fleet_bench: a bag failed: " + "; ".join(
            f"{b['name']}: {b['error']}" for b in report["bags"] if b.get("error")))
    t = report["totals"]
    over = [b["overhead_s"] for b in report["bags"] if "overhead_s" in b]
    shutil.rmtree(out, ignore_errors=True)
    return {"backend": report["backend"], "workers": report["workers"], "frames": t["frames_in"],
            "processing_s": report["processing_s"], "frames_per_s": t["frames_per_s"],
            "overhead_s_mean": sum(over) / len(over), "overhead_s_max": max(over),
            "worker_load_s": report["worker_load_s"], "wall_s": report["wall_s"],
            "workers_ready_s": report.get("workers_ready_s")}


def neural_load(config: str) -> Dict[str, float]:
    from hqsmem_ros.tools.bench import with_random_weights
    from hqsmem_ros.core.config import load_config
    from hqsmem_ros.core.pipeline import HQSMemPipeline
    from hqsmem_ros.fleet.workers import WorkerState

    cfg = with_random_weights(load_config(config).replace(device="cpu", precision="fp32"))
    t0 = time.perf_counter()
    HQSMemPipeline(cfg)  # built only, to time the model loads: no frames, no session
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    HQSMemPipeline(cfg)
    again = time.perf_counter() - t0
    state = WorkerState(cfg.to_dict())
    first = state.load()  # once per worker
    t0 = time.perf_counter()
    state.pipeline.reset()  # what each further bag pays: process_bag(pipeline=) resets it
    reset = time.perf_counter() - t0
    return {"config": config, "models": {k: cfg.to_dict()[k]["type"] for k in ("tracker", "refiner", "features")},
            "cold_s": cold, "rebuild_s": again, "worker_first_s": first, "reset_s": reset}


def main(argv=None) -> int:
    from hqsmem_ros.cli import _size

    ap = argparse.ArgumentParser(prog="python -m hqsmem_ros.tools.fleet_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bags", type=int, default=8)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", type=_size, default=(640, 480))
    ap.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    ap.add_argument("--format", choices=["rgb8", "bgr8", "jpeg", "png"], default="rgb8")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    ap.add_argument("--neural-config", help="also time building this config's models (random weights, CPU)")
    ap.add_argument("--tmp", help="folder for the bags (default: a temporary folder, removed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="hqsmem-fleet-bench-", dir=args.tmp))
    result: Dict[str, Any] = {"bags": args.bags, "frames_per_bag": args.frames,
                              "size": f"{args.size[0]}x{args.size[1]}", "storage": args.storage,
                              "format": args.format, "cores": len(os.sched_getaffinity(0)), "runs": []}
    try:
        print(f"fleet_bench: writing {args.bags} bags of {args.frames} frames {result['size']} in {root}",
              file=sys.stderr)
        bags = make_bags(root, args.bags, args.frames, args.size, args.storage, args.format)
        runs: List[Dict[str, Any]] = result["runs"]
        for n in args.workers:
            print(f"fleet_bench: local pool, {n} workers", file=sys.stderr)
            runs.append(run_once(bags, root / f"out_local{n}", n))
        ray_ok = False
        if not args.no_ray:
            try:
                import ray
                ray_ok = True
            except ImportError:
                print("fleet_bench: Ray is not installed; no Ray run", file=sys.stderr)
        if ray_ok:
            n = max(args.workers)
            print(f"fleet_bench: local Ray instance, {n} workers", file=sys.stderr)
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
            try:
                runs.append(run_once(bags, root / "out_ray", n, ray_address="auto"))
            finally:
                ray.shutdown()
        local = {r["workers"]: r for r in runs if r["backend"] == "local"}
        if 1 in local:
            result["speedup_over_1_worker"] = {str(n): r["frames_per_s"] / local[1]["frames_per_s"]
                                               for n, r in local.items() if n != 1}
        ray_runs = [r for r in runs if r["backend"] == "ray"]
        if ray_runs and ray_runs[0]["workers"] in local:
            result["ray_over_local"] = ray_runs[0]["frames_per_s"] / local[ray_runs[0]["workers"]]["frames_per_s"]
        if args.neural_config:
            print(f"fleet_bench: building {args.neural_config}'s models (random weights, CPU)", file=sys.stderr)
            result["neural_model_load"] = neural_load(args.neural_config)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"fleet_bench: {args.bags} bags x {args.frames} frames {result['size']} ({args.storage}, {args.format}), "
          f"{result['cores']} usable cores")
    for r in result["runs"]:
        print(f"  {r['backend']:<5} {r['workers']} workers: {r['frames_per_s']:7.1f} frames/s over all bags "
              f"({r['frames']} frames in {r['processing_s']:.1f} s); overhead per bag mean "
              f"{r['overhead_s_mean']:.3f} s, max {r['overhead_s_max']:.3f} s; model load per worker "
              + ", ".join(f"{v:.2f}" for v in r["worker_load_s"]) + " s; last worker ready after "
              f"{r['workers_ready_s']:.2f} s")
    for n, s in (result.get("speedup_over_1_worker") or {}).items():
        print(f"  local {n} workers / 1 worker: {s:.2f}x")
    if "ray_over_local" in result:
        print(f"  Ray / local pool at the same worker count: {result['ray_over_local']:.2f}x")
    nl = result.get("neural_model_load")
    if nl:
        print(f"  models of {nl['config']} ({', '.join(f'{k} {v}' for k, v in nl['models'].items())}), random "
              f"weights, CPU: cold {nl['cold_s']:.2f} s, rebuilt {nl['rebuild_s']:.2f} s (per bag if each "
              f"built its own), a worker's one build {nl['worker_first_s']:.2f} s, later bags (a reset) {nl['reset_s']:.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
