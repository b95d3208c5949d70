"""`hqsmem bags`: re-process many recorded bags, on all local cores or on a Ray cluster.

  hqsmem bags INPUT... --out DIR [--image-topic T] [--prompts-dir DIR | --prompt-topic T]
                [--config FILE] [--workers N] [--ray ADDRESS] [--ship-checkpoints] [--force]

INPUT: bags (a bag folder, or a single .mcap/.db3 file) or folders searched for bags. Each bag
goes through `hqsmem bag` (hqsmem_ros.bag.process_bag, with the worker's pipeline) into DIR/<name>, so its
messages are those of a single-bag run, whichever way this command ran it.

Local by default: a pool of worker processes (`--workers`, default: the usable cores, or one per
GPU when the config runs on CUDA), each building the models once and taking bags one after
another. `--ray ADDRESS` (`auto`, `ray://...`, or `local` for a Ray instance on this machine)
runs the same work as Ray actors, one GPU each when the config uses CUDA.

Resumable: beside each finished bag, DIR/<name>.hqsmem.json (the manifest) records what it was
made from (input files' sizes and mtimes, the resolved config's hash, the prompts file and its
masks' hashes, checkpoint sizes/mtimes, the options and a hash of this package's code) and the
bag's summary. A bag whose output and matching manifest exist is skipped unless --force. A bag
is written to DIR/.hqsmem-bags-work/<name> and renamed into place after its manifest is written,
so a killed run never leaves an output that looks complete. A failing bag is reported with its
error and does not stop the others; the exit status is 0 only when every bag succeeded.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .plan import (LOCK_NAME, MANIFEST_SUFFIX, NEURAL_TYPES, SUMMARY_NAME, WORK_DIR, FleetError, Job,
                   _write_json_atomic, config_digest, is_complete, plan, read_manifest, resolve_config)
from ..progress import Progress
from .workers import LocalPool, _import_ray, run_ray


# ---------------------------------------------------------------------------------------------
# The parent: plan, run, report


def _uses_cuda(cfg: Dict[str, Any]) -> bool:
    dev = str(cfg.get("device", "auto"))
    if dev.startswith("cuda"):
        return True
    if dev != "auto" or not any(cfg[k].get("type") in NEURAL_TYPES for k in ("tracker", "refiner", "features")):
        return False
    try:
        import torch
        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _local_gpus(cfg: Dict[str, Any]) -> Optional[List[str]]:
    """CUDA_VISIBLE_DEVICES per worker slot: one GPU each for device cuda/auto; None when the
    config names one GPU (cuda:N: every worker uses that one) or runs on the CPU."""
    if not _uses_cuda(cfg) or str(cfg.get("device")).startswith("cuda:"):
        return None
    import torch
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
    return ids or None


class _Bar:
    """Frames done over all bags, frames/s and ETA: tqdm's bar on a terminal when tqdm is
    installed, else hqsmem_ros.progress's line (every 10 s in a log file, and one at the end)."""

    def __init__(self, total: int, enabled: bool):
        self.line = Progress(total, enabled=enabled, name="hqsmem bags")
        self.tqdm = None
        self.done = 0
        if enabled and self.line.tty:
            try:
                from tqdm import tqdm
                self.tqdm = tqdm(total=total or None, unit="frames", desc="hqsmem bags", file=sys.stderr,
                                 mininterval=0.2, dynamic_ncols=True)
            except ImportError:  # not a dependency of this package: the plain line then
                self.tqdm = None

    def update(self, done: int) -> None:
        if done <= self.done:
            return
        if self.tqdm is not None:
            self.tqdm.update(done - self.done)
        else:
            self.line.update(done)
        self.done = done

    def write(self, text: str) -> None:
        if self.tqdm is not None:
            self.tqdm.write(text, file=sys.stderr)
        else:
            self.line.write(text)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.done:
            self.line.finish(self.done)


def _lock(out: Path):
    import fcntl

    f = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise FleetError(f"another `hqsmem bags` is writing to {out} (lock {out / LOCK_NAME})")
    return f


def run_bags(inputs: Sequence[str], out_dir: str, image_topic: Optional[str] = None,
             prompts_dir: Optional[str] = None, prompt_topic: Optional[str] = None, config=None,
             workers: Optional[int] = None, ray_address: Optional[str] = None, force: bool = False,
             ship_checkpoints: bool = False, progress: bool = True, overlay: bool = False,
             storage: Optional[str] = None, ns: str = "/hqsmem_node", exclude_topics: Sequence[str] = (),
             allow_random_weights: bool = False, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Process the bags; returns the report ({"bags": [rows], "totals": {...}, ...})."""
    from ..core.config import ConfigError

    if prompts_dir is not None and prompt_topic is not None:
        raise FleetError("give either --prompts-dir or --prompt-topic, not both")
    if workers is not None and workers < 1:
        raise FleetError(f"--workers must be at least 1, got {workers}")
    if ship_checkpoints and ray_address is None:
        raise FleetError("--ship-checkpoints only applies with --ray (local workers read the checkpoints themselves)")
    if prompts_dir is not None and not Path(prompts_dir).is_dir():
        raise FleetError(f"--prompts-dir {prompts_dir} is not a folder")
    if ray_address is not None:
        _import_ray()
    try:
        cfg = resolve_config(config)
    except ConfigError as exc:
        raise FleetError(str(exc))
    options = {"overlay": overlay, "storage": storage, "ns": ns, "exclude_topics": list(exclude_topics),
               "allow_random_weights": allow_random_weights}
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FleetError(f"cannot create output folder {out}: {exc.strerror or exc}")
    t_start = time.perf_counter()
    lock = _lock(out)
    try:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)  # what a killed run left (the lock says none runs)
        jobs = plan(inputs, out, image_topic, prompts_dir, prompt_topic, cfg, options)
        rows: Dict[int, Dict[str, Any]] = {}
        todo: List[Job] = []
        for job in jobs:
            base = {"index": job.index, "name": job.name, "in_bag": job.in_bag, "out_bag": job.out_bag,
                    "frames_expected": job.frames}
            if job.error:
                rows[job.index] = {**base, "status": "failed", "error": job.error, "summary": None}
                continue
            done = None if force else is_complete(job)
            if done is not None:
                rows[job.index] = {**base, "status": "skipped", "error": None, "summary": done.get("summary")}
                continue
            if Path(job.out_bag).exists() and not force and read_manifest(Path(job.manifest)) is None:
                rows[job.index] = {**base, "status": "failed", "summary": None,
                                   "error": f"output {job.out_bag} exists but has no manifest "
                                            f"({job.name + MANIFEST_SUFFIX}) from hqsmem bags; --force replaces it"}
                continue
            for stale in (Path(job.manifest), Path(job.out_bag)):  # older output or another config
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
            rows[job.index] = {**base, "status": "pending", "error": None, "summary": None}
            todo.append(job)
        report: Dict[str, Any] = {"out": str(out), "backend": "ray" if ray_address else "local", "workers": 0,
                                  "worker_load_s": [], "config_sha256": config_digest(cfg)}
        if todo:
            _execute(todo, rows, report, cfg, options, workers, ray_address, ship_checkpoints, progress, log)
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)  # empty unless a worker was lost mid-bag
        report["wall_s"] = time.perf_counter() - t_start
        report["bags"] = [rows[k] for k in sorted(rows)]
        report["totals"] = _totals(report)
        _write_json_atomic(out / SUMMARY_NAME, report)
        return report
    finally:
        lock.close()


def _execute(todo, rows, report, cfg, options, workers, ray_address, ship, progress, log) -> None:
    bar = _Bar(sum(j.frames for j in todo), progress)
    say = log or bar.write
    live: Dict[int, int] = {}
    finished = [0]
    sent: Dict[int, float] = {}
    t_first = [None]

    t_exec = time.perf_counter()

    def on_event(kind, wid, *args):
        if kind == "ready":
            report["worker_load_s"].append(round(args[0], 3))
            report["workers_ready_s"] = time.perf_counter() - t_exec  # start-up of the last one ready
            say(f"hqsmem bags: worker {args[1]} ready, models built in {args[0]:.2f} s")
        elif kind == "dispatch":
            sent[args[0]] = time.perf_counter()
            t_first[0] = t_first[0] or time.perf_counter()
        elif kind == "progress":
            live[args[0]] = args[1]
        elif kind == "fatal":
            say(f"hqsmem bags: error: a worker could not start: {args[0]}")
        elif kind == "result":
            index, row = args
            live.pop(index, None)
            r = rows[index]
            r.update({k: row.get(k) for k in ("status", "error", "summary", "worker", "job_s")})
            summ = row.get("summary") or {}
            finished[0] += summ.get("frames_in", 0) if summ else 0
            if index in sent:
                r["roundtrip_s"] = time.perf_counter() - sent[index]
                wall = (summ.get("seconds") or {}).get("wall") if summ else None
                if wall is not None:
                    r["overhead_s"] = r["roundtrip_s"] - wall
            for w in row.get("warnings") or []:
                if w.startswith("warning:"):
                    r.setdefault("warning_count", 0)
                    r["warning_count"] += 1
            say(f"hqsmem bags: {r['name']}: {r['status']}" + (f": {r['error']}" if r["error"] else ""))
        bar.update(finished[0] + sum(live.values()))

    try:
        if ray_address is not None:
            dev = str(cfg.get("device", "auto"))
            neural = any(cfg[k].get("type") in NEURAL_TYPES for k in ("tracker", "refiner", "features"))
            cuda = True if dev.startswith("cuda") else (None if dev == "auto" and neural else False)
            report["workers"] = workers or 0
            run_ray(todo, cfg, options, ray_address, workers or 0, cuda, ship, on_event)
        else:
            from ..bag import usable_cores

            gpus = _local_gpus(cfg)
            n = workers or (len(gpus) if gpus else (1 if _uses_cuda(cfg) else usable_cores()))
            n = max(1, min(n, len(todo)))
            report["workers"] = n
            pool = LocalPool(n, cfg, options, cuda=gpus)
            try:
                pool.run(todo, on_event)
            finally:
                pool.close()
    finally:
        bar.close()
    if t_first[0] is not None:
        report["processing_s"] = time.perf_counter() - t_first[0]
    if report["backend"] == "ray":
        report["workers"] = report["workers"] or len(report["worker_load_s"])


def _totals(report) -> Dict[str, Any]:
    bags = report["bags"]
    t: Dict[str, Any] = {s: sum(1 for b in bags if b["status"] == s) for s in ("done", "skipped", "failed")}
    t["bags"] = len(bags)
    ran = [b for b in bags if b["status"] == "done" and b.get("summary")]
    t["frames_in"] = sum(b["summary"]["frames_in"] for b in ran)
    t["results"] = sum(b["summary"]["results"] for b in ran)
    t["dropped"] = sum(b["summary"]["dropped_total"] for b in ran)
    if report.get("processing_s") and t["frames_in"]:
        t["frames_per_s"] = t["frames_in"] / report["processing_s"]
    over = [b["overhead_s"] for b in ran if "overhead_s" in b]
    if over:
        t["overhead_s_mean"] = sum(over) / len(over)
        t["overhead_s_max"] = max(over)
    t["all_ok"] = t["failed"] == 0
    return t


def format_report(report: Dict[str, Any]) -> str:
    head = f"{'bag':<28} {'status':<8} {'frames':>7} {'results':>7} {'dropped':<22} {'time s':>7} {'ovh s':>6}"
    lines = [f"hqsmem bags: {report['totals']['bags']} bags -> {report['out']} ({report['backend']}, "
             f"{report['workers']} workers)", head]
    errors = []
    for b in report["bags"]:
        s = b.get("summary") or {}
        drop = ", ".join(f"{k} {v}" for k, v in sorted((s.get("dropped") or {}).items())) or ("-" if s else "")
        wall = (s.get("seconds") or {}).get("wall")
        lines.append(f"{b['name'][:28]:<28} {b['status']:<8} {s.get('frames_in', ''):>7} {s.get('results', ''):>7} "
                     f"{drop[:22]:<22} {'' if wall is None else f'{wall:.1f}':>7} "
                     f"{'' if 'overhead_s' not in b else format(b['overhead_s'], '.2f'):>6}")
        if b.get("error"):
            errors.append(f"  {b['name']}: {b['error']}")
    t = report["totals"]
    lines.append(f"done {t['done']}, skipped {t['skipped']} (complete output with the same inputs), failed {t['failed']}; "
                 f"frames {t['frames_in']}, results {t['results']}, dropped {t['dropped']}"
                 + (f"; {t['frames_per_s']:.1f} frames/s over all bags" if "frames_per_s" in t else "")
                 + f"; wall {report['wall_s']:.1f} s")
    if report.get("worker_load_s"):
        lines.append("model load per worker (s): " + ", ".join(f"{v:.2f}" for v in report["worker_load_s"]))
    if "overhead_s_mean" in t:
        lines.append(f"scheduling overhead per bag (round trip - process_bag's run): mean {t['overhead_s_mean']:.2f} s, "
                     f"max {t['overhead_s_max']:.2f} s")
    if errors:
        lines.append("errors:")
        lines += errors
    lines.append(f"summary JSON: {Path(report['out']) / SUMMARY_NAME}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line (registered in hqsmem_ros/cli.py)


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="bag folders, .mcap/.db3 files, or folders of bags")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<bag name> per bag")
    p.add_argument("--image-topic", help="image topic (default: the bag's only Image/CompressedImage topic)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompts-dir", metavar="DIR", help="prompts files named <bag name>.prompts.yaml")
    group.add_argument("--prompt-topic", metavar="TOPIC", help="hqsmem_ros/ObjectPromptArray topic in each bag")
    p.add_argument("--config", help="pipeline YAML (default: built-in weight-free CPU pipeline)")
    p.add_argument("--workers", type=int, help="worker processes / Ray actors (default: usable cores; "
                                               "one per GPU when the config runs on CUDA)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster: auto, ray://HOST:PORT, or local")
    p.add_argument("--ship-checkpoints", action="store_true",
                   help="with --ray: send the config's checkpoint files to the workers through Ray's object store")
    p.add_argument("--force", action="store_true", help="process bags whose complete output exists too")
    p.add_argument("--overlay", action="store_true", help="also write <ns>/overlay (rgb8)")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], help="output storage (default: as each input)")
    p.add_argument("--ns", default="/hqsmem_node", help="namespace of the output topics")
    p.add_argument("--exclude-topic", action="append", default=[], metavar="TOPIC")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="run a config whose models have random_weights: true (speed tests only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-bag lines")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_from_args(args) -> int:
    """exit status: 0 when every bag is done or skipped, 1 when any failed."""
    report = run_bags(args.inputs, args.out, image_topic=args.image_topic, prompts_dir=args.prompts_dir,
                      prompt_topic=args.prompt_topic, config=args.config, workers=args.workers,
                      ray_address=args.ray, force=args.force, ship_checkpoints=args.ship_checkpoints,
                      progress=not args.quiet, overlay=args.overlay, storage=args.storage, ns=args.ns,
                      exclude_topics=args.exclude_topic, allow_random_weights=args.allow_random_weights,
                      log=(lambda text: None) if args.quiet else None)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["totals"]["all_ok"] else 1
