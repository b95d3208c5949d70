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

import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

MANIFEST_SUFFIX = ".hqsmem.json"
WORK_DIR = ".hqsmem-bags-work"
LOCK_NAME = ".hqsmem-bags.lock"
SUMMARY_NAME = "hqsmem_bags_summary.json"
MANIFEST_FORMAT = 1
BAG_SUFFIXES = (".mcap", ".db3")
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
NEURAL_TYPES = ("deaot", "sam2", "sam_hq", "dino")
INSTALL_RAY = "pip install 'hqsmem_ros[cluster]' (or: pip install ray)"


class FleetError(ValueError):
    """A request that cannot run at all (no bags, bad options): one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Finding the bags


@dataclass
class Job:
    """One input bag and where its output goes; plain data, sent to the workers."""

    index: int
    name: str  # output name relative to DIR (a/b for DIR/a/b)
    in_bag: str
    out_bag: str
    work_bag: str
    manifest: str
    image_topic: str = ""
    prompts_file: Optional[str] = None
    prompt_topic: Optional[str] = None
    frames: int = 0  # images on the image topic, from the bag's metadata (0: unknown)
    key: Dict[str, Any] = field(default_factory=dict)  # what the manifest must match
    error: Optional[str] = None  # found while planning: the bag fails without running


def _is_bag_dir(p: Path) -> bool:
    return p.is_dir() and (p / "metadata.yaml").is_file()


def find_bags(inputs: Sequence[str], out_dir: Path) -> List[tuple]:
    """[(input bag path, output name)] in a stable order; FleetError for missing inputs,
    folders without bags and two bags that would get the same output name."""
    found: List[tuple] = []
    out_dir = out_dir.resolve()
    for text in inputs:
        p = Path(text)
        if not p.exists():
            raise FleetError(f"input not found: {p}")
        if p.is_file():
            if p.suffix not in BAG_SUFFIXES:
                raise FleetError(f"{p} is not a bag (a bag is a folder with metadata.yaml, or a .mcap/.db3 file)")
            found.append((p, p.stem))
        elif _is_bag_dir(p):
            found.append((p, p.resolve().name))
        else:
            inside = []
            for root, dirs, files in os.walk(p):
                r = Path(root)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (r / d).resolve() != out_dir)
                for d in list(dirs):
                    if _is_bag_dir(r / d):
                        inside.append((r / d, (r / d).relative_to(p).as_posix()))
                        dirs.remove(d)  # a bag folder's own files are not bags of their own
                for f in sorted(files):
                    if Path(f).suffix in BAG_SUFFIXES and not f.startswith("."):
                        rel = (r / f).relative_to(p)
                        inside.append((r / f, rel.with_suffix("").as_posix()))
            if not inside:
                raise FleetError(f"no bags in folder {p} (a bag is a folder with metadata.yaml, or a .mcap/.db3 file)")
            found.extend(sorted(inside, key=lambda x: x[1]))
    names: Dict[str, Path] = {}
    for path, name in found:
        if name in names:
            raise FleetError(f"two inputs would both be written to {out_dir / name}: {names[name]} and {path}")
        names[name] = path
    return found


def _inspect(path: Path, image_topic: Optional[str]):
    """(image topic, images on it) from the bag's metadata; ("", 0) when it cannot be read
    (the worker's process_bag then reports why, in its own words). FleetError-like text for a
    bag whose image topic cannot be chosen."""
    from rosbags.rosbag2 import Reader

    try:
        reader = Reader(path)
        reader.open()
    except Exception:
        return image_topic or "", 0, None
    try:
        topics: Dict[str, List[Any]] = {}
        for c in reader.connections:
            topics.setdefault(c.topic, []).append(c)
        if image_topic is None:
            images = sorted(t for t, cs in topics.items() if cs[0].msgtype in IMAGE_TYPES)
            if len(images) != 1:
                what = ", ".join(images) if images else "none"
                return "", 0, (f"{path}: cannot choose the image topic (image topics: {what}); "
                               "give --image-topic")
            image_topic = images[0]
        frames = sum(c.msgcount for c in topics.get(image_topic, []))
        return image_topic, frames, None
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# What an output was made from


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_stat(p: Path, name: Optional[str] = None) -> Dict[str, Any]:
    st = p.stat()
    return {"file": name or str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_files(bag: Path) -> List[Dict[str, Any]]:
    """Size and mtime of the bag's files (a changed or re-recorded bag is processed again)."""
    if bag.is_file():
        return [_file_stat(bag, bag.name)]
    return [_file_stat(f, f.relative_to(bag).as_posix()) for f in sorted(bag.rglob("*")) if f.is_file()]


def prompts_digest(path: Optional[Path]) -> Optional[str]:
    """sha256 over the prompts file and the mask PNGs it names (None without a file)."""
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        text = path.read_bytes()
    except OSError:
        return "unreadable"
    h.update(text)
    try:
        import yaml
        data = yaml.safe_load(text) or {}
        masks = sorted({str(e["mask"]) for e in data.get("prompts", []) or [] if isinstance(e, dict) and "mask" in e})
    except Exception:  # the worker's process_bag reports what is wrong with the file
        masks = []
    for rel in masks:
        m = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        h.update(rel.encode())
        try:
            h.update(hashlib.sha256(m.read_bytes()).digest())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


_CODE_DIGEST: Optional[str] = None


def code_digest() -> str:
    """sha256 of this package's Python files and message definitions: the code version."""
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        pkg = Path(__file__).resolve().parent
        h = hashlib.sha256()
        files = sorted(pkg.rglob("*.py")) + sorted((pkg.parent / "msg").glob("*.msg"))
        for f in files:
            h.update(f.relative_to(pkg.parent).as_posix().encode())
            h.update(f.read_bytes())
        _CODE_DIGEST = h.hexdigest()
    return _CODE_DIGEST


def resolve_config(config) -> Dict[str, Any]:
    """The config as a plain dict with checkpoint paths made absolute (workers may run elsewhere)."""
    from .core.config import load_config

    d = load_config(config).to_dict()
    for key in ("tracker", "refiner", "features"):
        ck = d[key].get("checkpoint")
        if ck:
            d[key]["checkpoint"] = str(Path(ck).expanduser().resolve())
    return d


def config_digest(cfg: Dict[str, Any]) -> str:
    return _sha256_bytes(json.dumps(cfg, sort_keys=True, default=str).encode())


def checkpoint_files(cfg: Dict[str, Any]) -> List[str]:
    return [cfg[k]["checkpoint"] for k in ("tracker", "refiner", "features") if cfg[k].get("checkpoint")]


def read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def output_files(bag: Path) -> Dict[str, int]:
    return {f.relative_to(bag).as_posix(): f.stat().st_size for f in sorted(bag.rglob("*")) if f.is_file()}


def is_complete(job: Job) -> Optional[Dict[str, Any]]:
    """The manifest when the job's output exists, is whole and was made from the same things."""
    out = Path(job.out_bag)
    m = read_manifest(Path(job.manifest))
    if m is None or m.get("key") != job.key or not out.is_dir():
        return None
    try:
        return m if output_files(out) == m.get("outputs") else None
    except OSError:
        return None


def _write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The work, in a worker (a local process or a Ray actor)


class WorkerState:
    """One worker: the resolved config, its pipeline (models built once, reused by every bag)
    and a frame counter for the parent's progress bar.

    Building the models again for every bag would cost their load time per bag (seconds for
    the neural profile, docs/benchmarks.md), so the worker builds one pipeline and hands it to
    every process_bag call (`pipeline=`), which resets it first: each bag's output is a fresh
    single-bag run's. process_bag's `progress=` callback counts the frames.
    """

    def __init__(self, cfg: Dict[str, Any], threads: int = 0, report: Optional[Callable] = None):
        self.cfg = cfg
        self.report = report  # report(job_index, frames), throttled
        self.job_index: Optional[int] = None
        self.frames = 0
        self.last_report = 0.0
        self.threads = threads
        self.pipeline = None
        self.load_s = 0.0
        if threads:
            import cv2
            cv2.setNumThreads(threads)

    def load(self) -> float:
        """Build the pipeline (once); returns the seconds it took (importing the bag code included)."""
        t0 = time.perf_counter()
        from . import bag  # noqa: F401 (its imports count as loading)
        from .core.pipeline import HQSMemPipeline
        from .io.bagfiles import make_typestore

        make_typestore()  # the message types, parsed once per process
        self.pipeline = HQSMemPipeline(self.cfg)
        if "torch" in sys.modules and self.threads:
            sys.modules["torch"].set_num_threads(self.threads)
        self.load_s = time.perf_counter() - t0
        return self.load_s

    def progress(self, done: int, total: int) -> None:
        """process_bag's progress callback: frames done in the current bag, reported every 0.25 s."""
        self.frames = done
        now = time.perf_counter()
        if self.report is not None and self.job_index is not None and now - self.last_report > 0.25:
            self.last_report = now
            self.report(self.job_index, done)

    def run(self, job: Job, options: Dict[str, Any]) -> Dict[str, Any]:
        return run_job(self, job, options)


def run_job(state: WorkerState, job: Job, options: Dict[str, Any]) -> Dict[str, Any]:
    """process_bag into the work folder, write the manifest, move the bag into place."""
    from .bag import BagError, process_bag
    from .core.config import ConfigError
    from .io.prompts_file import PromptsFileError

    t0 = time.perf_counter()
    state.job_index, state.frames, state.last_report = job.index, 0, 0.0
    warnings: List[str] = []
    row: Dict[str, Any] = {"index": job.index, "status": "failed", "error": None, "summary": None,
                           "warnings": warnings, "worker": f"{os.uname().nodename}:{os.getpid()}"}
    work, out, manifest = Path(job.work_bag), Path(job.out_bag), Path(job.manifest)
    try:
        if job.key.get("code") != code_digest():
            raise BagError("this worker runs other hqsmem_ros code than the command that sent the bag "
                           "(install the same version on every node)")
        if state.pipeline is None:
            state.load()
        shutil.rmtree(work, ignore_errors=True)
        work.parent.mkdir(parents=True, exist_ok=True)
        summary = process_bag(job.in_bag, work, job.image_topic, prompts_file=job.prompts_file,
                              prompt_topic=job.prompt_topic, config=state.cfg, pipeline=state.pipeline,
                              progress=state.progress, log=lambda text: warnings.append(text), **options)
        data = summary.to_dict()
        data["out_bag"] = str(out)
        row["summary"] = data
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(manifest, {"format": MANIFEST_FORMAT, "key": job.key, "outputs": output_files(work),
                                      "summary": data, "written": time.time()})
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        row["status"] = "done"
    except (BagError, PromptsFileError, ConfigError, OSError) as exc:
        row["error"] = str(exc)
    except Exception as exc:  # a bug or a model failing on this bag: reported, the others go on
        where = traceback.extract_tb(exc.__traceback__)[-1]
        row["error"] = f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
    finally:
        if row["status"] != "done":
            shutil.rmtree(work, ignore_errors=True)
        state.job_index = None
    row["job_s"] = time.perf_counter() - t0
    row["frames_counted"] = state.frames
    return row


# ---------------------------------------------------------------------------------------------
# Local process pool


def _parent_watch(ppid: int) -> None:
    """Linux: die with the parent (a killed `hqsmem bags` leaves no workers behind)."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != ppid:
        os._exit(1)


def _worker_main(wid: int, cfg, options, threads: int, cores, env: Dict[str, str], ppid: int, tasks, results) -> None:
    _parent_watch(ppid)
    os.environ.update(env)  # before any model library is imported
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    import queue as queue_mod
    try:
        state = WorkerState(cfg, threads, report=lambda i, n: results.put(("progress", wid, i, n)))
        load_s = state.load()
    except BaseException as exc:  # e.g. a missing checkpoint: every bag would fail the same way
        results.put(("fatal", wid, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", wid, load_s, os.getpid()))
    while True:
        try:
            job = tasks.get(timeout=1.0)
        except queue_mod.Empty:
            if os.getppid() != ppid:
                return
            continue
        if job is None:
            return
        results.put(("result", wid, job.index, state.run(job, options)))


class LocalPool:
    """Worker processes (spawned, so no state is shared), each with its own task queue so that
    the parent knows which bag a worker holds; a worker that dies fails only that bag and is
    replaced. (concurrent.futures' pool fails every pending task when one worker dies.)"""

    def __init__(self, n: int, cfg, options, cuda: Optional[List[str]] = None, pin: bool = False):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.cfg, self.options = cfg, options
        self.results = self.ctx.Queue()
        self.n = n
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.core_sets: List[Optional[set]] = [None] * n
        if pin and cores and n <= len(cores) and not cuda:
            per = len(cores) // n
            self.core_sets = [set(cores[k * per:(k + 1) * per]) for k in range(n)]
        self.threads = max(1, (len(cores) or os.cpu_count() or 1) // n)
        self.cuda = cuda
        self.procs: Dict[int, Any] = {}
        self.tasks: Dict[int, Any] = {}
        self.next_id = 0

    def env_for(self, slot: int) -> Dict[str, str]:
        env = {k: str(self.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        if self.cuda:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda[slot % len(self.cuda)]
        return env

    def start(self, slot: int) -> int:
        wid = self.next_id
        self.next_id += 1
        tasks = self.ctx.Queue()
        p = self.ctx.Process(target=_worker_main, name=f"hqsmem-bags-{wid}",
                             args=(wid, self.cfg, self.options, self.threads, self.core_sets[slot],
                                   self.env_for(slot), os.getpid(), tasks, self.results), daemon=True)
        p.start()
        p.slot = slot
        self.procs[wid], self.tasks[wid] = p, tasks
        return wid

    def close(self) -> None:
        for wid, q in self.tasks.items():
            if self.procs[wid].is_alive():
                q.put(None)
        deadline = time.time() + 10
        for p in self.procs.values():
            p.join(timeout=max(0.1, deadline - time.time()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def run(self, jobs: List[Job], on_event: Callable) -> None:
        """Runs the jobs; on_event(kind, ...) gets ready/progress/result/fatal events."""
        import queue as queue_mod

        pending = list(jobs)
        busy: Dict[int, Job] = {}
        idle: List[int] = []
        for slot in range(min(self.n, len(jobs))):
            self.start(slot)
        fatal = None
        restarts = 0
        finished: set = set()
        last_check = 0.0
        while (pending and fatal is None) or busy:
            while idle and pending and fatal is None:
                wid = idle.pop()
                job = pending.pop(0)
                busy[wid] = job
                on_event("dispatch", wid, job.index)
                self.tasks[wid].put(job)
            try:
                msg = self.results.get(timeout=0.2)
            except queue_mod.Empty:
                msg = None
            if msg is not None:
                kind, wid = msg[0], msg[1]
                if kind == "ready":
                    idle.append(wid)
                    on_event("ready", wid, msg[2], msg[3])
                elif kind == "progress":
                    on_event("progress", wid, msg[2], msg[3])
                elif kind == "result":
                    busy.pop(wid, None)
                    idle.append(wid)
                    if msg[2] not in finished:
                        finished.add(msg[2])
                        on_event("result", wid, msg[2], msg[3])
                elif kind == "fatal":
                    fatal = msg[2]
                    self.procs[wid].reported = True
                    on_event("fatal", wid, fatal)
            if time.perf_counter() - last_check < 0.5 and msg is not None:
                continue
            last_check = time.perf_counter()
            for wid, p in list(self.procs.items()):  # a worker that died: its bag fails, a new one starts
                if p.is_alive() or getattr(p, "reported", False):
                    continue
                p.reported = True
                if wid in idle:
                    idle.remove(wid)
                job = busy.pop(wid, None)
                if job is not None and job.index not in finished:
                    finished.add(job.index)
                    on_event("result", wid, job.index, {
                        "index": job.index, "status": "failed", "summary": None, "warnings": [],
                        "error": f"the worker process died (exit code {p.exitcode}) while processing this bag",
                        "worker": f"{os.uname().nodename}:{p.pid}"})
                if pending and fatal is None and restarts < 2 * self.n:
                    restarts += 1
                    self.start(p.slot)
            if pending and fatal is None and not busy and not any(p.is_alive() for p in self.procs.values()):
                fatal = "every worker process exited before it was ready"
        for job in pending:
            on_event("result", -1, job.index, {"index": job.index, "status": "failed", "summary": None,
                                              "warnings": [], "error": f"no worker could start: {fatal}",
                                              "worker": ""})


# ---------------------------------------------------------------------------------------------
# Ray


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise FleetError(f"--ray needs Ray, which is not installed ({exc}); {INSTALL_RAY}")
    return ray


class _RayWorker:
    """A Ray actor around WorkerState: models built once in __init__, bags one after another."""

    def __init__(self, cfg, options, threads: int, shipped: Dict[str, Any], progress_queue):
        import ray

        self.options = options
        self.queue = progress_queue
        self.tmp = None
        if shipped:  # --ship-checkpoints: files through the object store, written locally
            import tempfile
            self.tmp = tempfile.mkdtemp(prefix="hqsmem-ckpt-")
            cfg = json.loads(json.dumps(cfg))
            for key in ("tracker", "refiner", "features"):
                path = cfg[key].get("checkpoint")
                if path in shipped:
                    data = ray.get(shipped[path])
                    local = Path(self.tmp) / f"{key}-{Path(path).name}"
                    local.write_bytes(data)
                    cfg[key]["checkpoint"] = str(local)
        self.state = WorkerState(cfg, threads, report=self._report)
        self.load_s = self.state.load()

    def _report(self, index: int, frames: int) -> None:
        try:
            self.queue.put_nowait((index, frames))
        except Exception:  # a full or gone queue only costs a progress update
            pass

    def ready(self):
        return self.load_s, f"{os.uname().nodename}:{os.getpid()}"

    def run(self, job: Job) -> Dict[str, Any]:
        return self.state.run(job, self.options)

    def close(self) -> None:
        """Remove the shipped checkpoints' copies (ray.kill skips Python's own clean-up)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_ray(jobs: List[Job], cfg, options, address: str, workers: int, cuda: Optional[bool], ship: bool,
            on_event: Callable) -> None:
    ray = _import_ray()
    from ray.util.queue import Queue

    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except Exception as exc:
            raise FleetError(f"cannot connect to the Ray cluster at {address!r}: {exc}")
    res = ray.cluster_resources()
    if cuda is None:  # device auto with neural models: the GPUs are where the cluster has them
        cuda = bool(res.get("GPU"))
    n = workers or (int(res.get("GPU", 0)) if cuda else int(res.get("CPU", 1)))
    if cuda and not res.get("GPU"):
        raise FleetError("the config runs on CUDA but the Ray cluster has no GPU resources")
    n = max(1, min(n, len(jobs)))
    shipped = {}
    if ship:
        for path in checkpoint_files(cfg):
            try:
                shipped[path] = ray.put(Path(path).read_bytes())
            except OSError as exc:
                raise FleetError(f"--ship-checkpoints: cannot read checkpoint {path}: {exc.strerror or exc}")
    progress = Queue(maxsize=10000)
    Actor = ray.remote(num_cpus=1, num_gpus=1 if cuda else 0, max_restarts=0)(_RayWorker)
    actors = [Actor.remote(cfg, options, 1, shipped, progress) for _ in range(n)]  # every actor made, to kill
    pending = list(jobs)
    running: Dict[Any, tuple] = {}
    ready_refs = {a.ready.remote(): a for a in actors}
    idle: List[Any] = []
    fatal = None

    def drain():
        try:
            for index, frames in progress.get_nowait_batch(progress.qsize()):
                on_event("progress", -1, index, frames)
        except Exception:
            pass

    try:
        while ready_refs or running or (pending and idle):
            while idle and pending:
                actor = idle.pop()
                job = pending.pop(0)
                on_event("dispatch", id(actor), job.index)
                running[actor.run.remote(job)] = (actor, job)
            refs = list(ready_refs) + list(running)
            if not refs:
                break
            done, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            drain()
            for ref in done:
                if ref in ready_refs:
                    actor = ready_refs.pop(ref)
                    try:
                        load_s, where = ray.get(ref)
                        idle.append(actor)
                        on_event("ready", id(actor), load_s, where)
                    except Exception as exc:
                        fatal = fatal or f"{type(exc).__name__}: {exc}".splitlines()[0]
                        on_event("fatal", id(actor), fatal)
                    continue
                actor, job = running.pop(ref)
                try:
                    row = ray.get(ref)
                    idle.append(actor)
                except Exception as exc:  # the actor died (node lost, out of memory, crash)
                    row = {"index": job.index, "status": "failed", "summary": None, "warnings": [], "worker": "",
                           "error": f"the Ray worker failed while processing this bag: {str(exc).splitlines()[0]}"}
                    replacement = Actor.remote(cfg, options, 1, shipped, progress)
                    actors.append(replacement)
                    ready_refs[replacement.ready.remote()] = replacement
                on_event("result", id(actor), job.index, row)
            if not ready_refs and not idle and not running and pending:
                break  # no actor could start
        drain()
    finally:
        if shipped:
            closing = [a.close.remote() for a in actors]
            ray.wait(closing, num_returns=len(closing), timeout=30)
        for a in actors:
            ray.kill(a)
        progress.shutdown()
    for job in pending:
        on_event("result", -1, job.index, {"index": job.index, "status": "failed", "summary": None, "warnings": [],
                                          "worker": "", "error": f"no Ray worker could start: {fatal}"})


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


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Bar:
    """Frames done over all bags, frames/s and ETA: tqdm's bar on a terminal when tqdm is
    installed, else a plain line every 10 s (and one at the end)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tqdm = None
        self.done = 0
        self.start = time.perf_counter()
        self.last = 0.0
        if not enabled:
            return
        if not getattr(sys.stderr, "isatty", lambda: False)():
            return  # a log file: a plain line every 10 s
        try:
            from tqdm import tqdm
            self.tqdm = tqdm(total=total or None, unit="frames", desc="hqsmem bags", file=sys.stderr,
                             mininterval=0.2, dynamic_ncols=True)
        except ImportError:  # not a dependency of this package: the plain line then
            self.tqdm = None

    def update(self, done: int) -> None:
        if not self.enabled or done <= self.done:
            return
        if self.tqdm is not None:
            self.tqdm.update(done - self.done)
        elif time.perf_counter() - self.last > 10.0:
            self.last = time.perf_counter()
            rate = done / max(1e-9, self.last - self.start)
            left = (self.total - done) / rate if rate > 0 and self.total else float("nan")
            eta = f"{int(left // 60)}:{int(left % 60):02d}" if math.isfinite(left) else "?"
            print(f"hqsmem bags: {done}/{self.total} frames, {rate:.1f} frames/s, ETA {eta}", file=sys.stderr)
        self.done = done

    def write(self, text: str) -> None:
        if self.tqdm is not None:
            self.tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.enabled and self.done:
            self.last = -math.inf
            done, self.done = self.done, 0
            self.update(done)


def _lock(out: Path):
    import fcntl

    f = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise FleetError(f"another `hqsmem bags` is writing to {out} (lock {out / LOCK_NAME})")
    return f


def plan(inputs: Sequence[str], out: Path, image_topic: Optional[str], prompts_dir: Optional[str],
         prompt_topic: Optional[str], cfg: Dict[str, Any], options: Dict[str, Any]) -> List[Job]:
    jobs = []
    common = {"format": MANIFEST_FORMAT, "config_sha256": config_digest(cfg), "code": code_digest(),
              "options": {**options, "prompt_topic": prompt_topic}}
    try:
        common["checkpoints"] = [_file_stat(Path(p)) for p in checkpoint_files(cfg)]
    except OSError as exc:
        raise FleetError(f"checkpoint not readable: {exc.filename}: {exc.strerror}")
    for k, (path, name) in enumerate(find_bags(inputs, out)):
        job = Job(k, name, str(path), str(out / name), str(out / WORK_DIR / name), str(out / (name + MANIFEST_SUFFIX)),
                  prompt_topic=prompt_topic)
        job.image_topic, job.frames, job.error = _inspect(path, image_topic)
        if prompts_dir is not None:
            pf = Path(prompts_dir) / (name + ".prompts.yaml")
            if pf.is_file():
                job.prompts_file = str(pf.resolve())
            elif job.error is None:
                job.error = f"{path}: no prompts file {pf} (--prompts-dir looks for <bag name>.prompts.yaml)"
        try:
            files = input_files(path)
        except OSError as exc:
            files, job.error = [], job.error or f"{path}: {exc.strerror or exc}"
        job.key = {**common, "input": files, "image_topic": job.image_topic,
                   "prompts_sha256": prompts_digest(Path(job.prompts_file) if job.prompts_file else None)}
        jobs.append(job)
    return jobs


def run_bags(inputs: Sequence[str], out_dir: str, image_topic: Optional[str] = None,
             prompts_dir: Optional[str] = None, prompt_topic: Optional[str] = None, config=None,
             workers: Optional[int] = None, ray_address: Optional[str] = None, force: bool = False,
             ship_checkpoints: bool = False, progress: bool = True, overlay: bool = False,
             storage: Optional[str] = None, ns: str = "/hqsmem_node", exclude_topics: Sequence[str] = (),
             allow_random_weights: bool = False, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Process the bags; returns the report ({"bags": [rows], "totals": {...}, ...})."""
    from .core.config import ConfigError

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
