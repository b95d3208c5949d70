"""`hqsmem bags`' workers: one pipeline per worker, bags one after another, in a local pool of
processes or as Ray actors."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .plan import (INSTALL_RAY, MANIFEST_FORMAT, FleetError, Job, _write_json_atomic, checkpoint_files,
                   code_digest, output_files)


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
        from .. import bag  # noqa: F401 (its imports count as loading)
        from ..core.pipeline import HQSMemPipeline
        from ..io.bagfiles import make_typestore

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
    from ..bag import BagError, process_bag
    from ..core.config import ConfigError
    from ..io.prompts_file import PromptsFileError

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
    import threading
    lock = threading.Lock()  # progress may come from process_bag's threads

    def send(*msg) -> None:
        with lock:
            results.send(msg)

    try:
        state = WorkerState(cfg, threads, report=lambda i, n: send("progress", wid, i, n))
        load_s = state.load()
    except BaseException as exc:  # e.g. a missing checkpoint: every bag would fail the same way
        send("fatal", wid, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
        return
    send("ready", wid, load_s, os.getpid())
    while True:
        try:
            job = tasks.get(timeout=1.0)
        except queue_mod.Empty:
            if os.getppid() != ppid:
                return
            continue
        if job is None:
            return
        send("result", wid, job.index, state.run(job, options))


class LocalPool:
    """Worker processes (spawned, so no state is shared), each with its own task queue so that
    the parent knows which bag a worker holds; a worker that dies fails only that bag and is
    replaced. (concurrent.futures' pool fails every pending task when one worker dies.)
    Each worker reports on its own pipe: one results Queue shared by all had one write lock, and
    a worker killed while its feeder thread held it left the next worker unable to report, so
    the run hung (seen once in a fresh-clone CI run of the killed-worker test)."""

    def __init__(self, n: int, cfg, options, cuda: Optional[List[str]] = None, pin: bool = False):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.cfg, self.options = cfg, options
        self.readers: Dict[int, Any] = {}  # wid -> the receiving end of that worker's pipe
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
        reader, writer = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_worker_main, name=f"hqsmem-bags-{wid}",
                             args=(wid, self.cfg, self.options, self.threads, self.core_sets[slot],
                                   self.env_for(slot), os.getpid(), tasks, writer), daemon=True)
        p.start()
        writer.close()  # the worker holds the only sending end: its death reads as end of file here
        self.readers[wid] = reader
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
        for conn in self.readers.values():
            conn.close()
        self.readers = {}

    def _receive(self, timeout: float) -> List[tuple]:
        """The messages the workers have sent, waiting up to `timeout` for the first."""
        from multiprocessing.connection import wait

        msgs = []
        for conn in wait(list(self.readers.values()), timeout):
            try:
                while True:
                    msgs.append(conn.recv())
                    if not conn.poll():
                        break
            except (EOFError, OSError):  # the worker is gone: the liveness check below fails its bag
                self.readers = {w: c for w, c in self.readers.items() if c is not conn}
                conn.close()
        return msgs

    def run(self, jobs: List[Job], on_event: Callable) -> None:
        """Runs the jobs; on_event(kind, ...) gets ready/progress/result/fatal events."""
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
            msgs = self._receive(timeout=0.2)
            for msg in msgs:
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
            if time.perf_counter() - last_check < 0.5 and msgs:
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


SHIPPED_COPY_PREFIX = "hqsmem-ckpt-"  # + the driver's pid: a Ray worker's copies of --ship-checkpoints files


class _RayWorker:
    """A Ray actor around WorkerState: models built once in __init__, bags one after another."""

    def __init__(self, cfg, options, threads: int, shipped: Dict[str, Any], progress_queue, driver_pid: int = 0):
        import ray

        self.options = options
        self.queue = progress_queue
        self.tmp = None
        if shipped:  # --ship-checkpoints: files through the object store, written locally
            import tempfile
            # Named after the driving process, so that runs side by side can tell their copies apart.
            self.tmp = tempfile.mkdtemp(prefix=f"{SHIPPED_COPY_PREFIX}{driver_pid}-")
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


def _ray_connect(ray, address: str, workers: int, cuda: Optional[bool], n_jobs: int) -> tuple:
    """Connect (or start `local`); (actors to start, whether they use a GPU)."""
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
    return max(1, min(n, n_jobs)), cuda


def _ship(ray, cfg) -> Dict[str, Any]:
    """--ship-checkpoints: the config's checkpoint files into Ray's object store, by path."""
    shipped = {}
    for path in checkpoint_files(cfg):
        try:
            shipped[path] = ray.put(Path(path).read_bytes())
        except OSError as exc:
            raise FleetError(f"--ship-checkpoints: cannot read checkpoint {path}: {exc.strerror or exc}")
    return shipped


def run_ray(jobs: List[Job], cfg, options, address: str, workers: int, cuda: Optional[bool], ship: bool,
            on_event: Callable) -> None:
    ray = _import_ray()
    from ray.util.queue import Queue

    n, cuda = _ray_connect(ray, address, workers, cuda, len(jobs))
    shipped = _ship(ray, cfg) if ship else {}
    progress = Queue(maxsize=10000)
    Actor = ray.remote(num_cpus=1, num_gpus=1 if cuda else 0, max_restarts=0)(_RayWorker)
    actors = [Actor.remote(cfg, options, 1, shipped, progress, os.getpid()) for _ in range(n)]  # every actor made, to kill
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
                    replacement = Actor.remote(cfg, options, 1, shipped, progress, os.getpid())
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
