"""Benchmarks of the ROS 2 tracking node over real DDS between processes (issue 3's targets).

overhead  Per-frame cost of the node itself (image conversion, message building, publishing:
          everything except the tracking pipeline) at 1280x720, against a bare rclpy node that
          only echoes the image, on the same frames in the same run; prints the ratio.
stream    A long run at a fixed rate through `hqsmem node` (the real entry point): every frame
          published must end as a result or a counted drop. Frames lost in the transport never
          reach the node: the node counts them from gaps in the publisher's sequence numbers,
          and the publisher's own count checks that figure.

  .venv/bin/python -m hqsmem_ros.tools.bench_node overhead --size 1280x720 --frames 300
  .venv/bin/python -m hqsmem_ros.tools.bench_node stream --size 320x240 --frames 5000 --rate 30 --qos both

Both use their own DDS domain (ROS_DOMAIN_ID if set, else one derived from the process id), so
nothing else on the machine hears them. Times are time.perf_counter() on one machine; the
machine's load average is printed with them. Exit status 0: `overhead` met its target (the
in-node median, wall clock), `stream` accounted for every frame (results + the node's drops +
the node's count of frames lost in transport = frames published); 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import psutil

from hqsmem_ros.ros.spinning import BackgroundSpinner

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "config" / "track.yaml"
NODE_NAME = "hqsmem_node"
ECHO_IN, ECHO_OUT = "bench/echo_in", "bench/echo_out"


def _size(text: str):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w < 16 or h < 16:
            raise ValueError
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1280x720, got {text!r}")


def _domain(arg: Optional[int]) -> int:
    if arg is not None:
        return arg
    if os.environ.get("ROS_DOMAIN_ID", "").isdigit():
        return int(os.environ["ROS_DOMAIN_ID"])
    return 101 + os.getpid() % 100


def _stamp_ns(k: int, rate: float, start: float = 1000.0) -> int:
    return int(round((start + k / rate) * 1e9))


def _set_stamp(msg, ns: int) -> None:
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(ns, 1_000_000_000)


def _key(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def _ms(values: Sequence[float]) -> Dict[str, float]:
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {"n": len(v), "median": 1000 * statistics.median(v), "mean": 1000 * statistics.fmean(v),
            "p90": 1000 * v[min(len(v) - 1, int(0.9 * len(v)))], "min": 1000 * v[0]}


def _fmt(s: Dict[str, float]) -> str:
    if not s.get("n"):
        return "no samples"
    return f"median {s['median']:7.2f} ms  mean {s['mean']:7.2f}  p90 {s['p90']:7.2f}  min {s['min']:7.2f}"


def _frames(size, count: int, n_objects: int, seed: int):
    """A synthetic sequence played forwards then backwards: smooth motion for any length."""
    from hqsmem_ros.data.synth import make_sequence
    frames, labels = make_sequence("bench", seed, tuple(size), count, n_objects)
    order = list(range(count)) + list(range(count - 2, 0, -1))
    return frames, labels, order


JPEG_QUALITY = 90  # a typical camera driver / image_transport setting


def _image_class(encoding: str):
    """(message class, the node's input topic, its input_type) for a bench encoding."""
    from sensor_msgs.msg import CompressedImage, Image
    if encoding == "jpeg":
        return CompressedImage, "image/compressed", "compressed"
    return Image, "image", "raw"


def _image_msgs(frames, encoding: str):
    from sensor_msgs.msg import CompressedImage, Image
    from hqsmem_ros.io import image_codec
    out = []
    for rgb in frames:
        if encoding == "jpeg":
            msg = CompressedImage()
            msg.format = "jpeg"
            msg.data = image_codec.encode_compressed(rgb, "jpeg", JPEG_QUALITY)
        else:
            pixels = np.ascontiguousarray(rgb[..., ::-1]) if encoding == "bgr8" else rgb
            msg = image_codec.fill_image_msg(Image(), image_codec.encode_image(pixels, encoding))
        msg.header.frame_id = "camera"
        out.append(msg)
    return out


def _write_label_png(label: np.ndarray, directory: str) -> str:
    from PIL import Image as PILImage
    path = os.path.join(directory, "initial_mask.png")
    PILImage.fromarray(label.astype(np.uint8)).save(path)
    return path


def _wait(predicate, timeout: float, what: str, proc: Optional[subprocess.Popen] = None) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench_node: the node process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > end:
            raise SystemExit(f"bench_node: timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Driver:
    """The benchmark's own rclpy context: publishers, result subscriptions, arrival times."""

    def __init__(self, domain: int):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor
        self.rclpy = rclpy
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=domain)
        self.node = rclpy.create_node("bench_driver", context=self.ctx)
        self.cv = threading.Condition()
        self.arrivals: Dict[str, Dict[int, float]] = {}
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.ctx)
        self.executor.add_node(self.node)
        self.spinner = BackgroundSpinner(self.executor)

    def start(self) -> None:
        self.spinner.start()

    def record(self, name: str, extra=None):
        store = self.arrivals.setdefault(name, {})

        def cb(msg):
            now = time.perf_counter()
            with self.cv:
                store[_key(msg)] = now
                if extra is not None:
                    extra(msg)
                self.cv.notify_all()
        return cb

    def wait_all(self, names: Sequence[str], key: int, timeout: float) -> Optional[float]:
        """Latest arrival of `key` on every named subscription, or None after `timeout`."""
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                got = [self.arrivals.get(n, {}).get(key) for n in names]
                if all(t is not None for t in got):
                    return max(got)
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cv.wait(min(left, 0.05))

    def close(self) -> None:
        self.spinner.stop()
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.ctx)


# ---------------------------------------------------------------------------------- children
def _child_echo(args) -> int:
    """A bare rclpy node: every image in is published again, unchanged (the reference cost)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    image_cls = _image_class(args.encoding)[0]
    rclpy.init(args=["bench_echo"])
    node = rclpy.create_node("bench_echo")
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub = node.create_publisher(image_cls, ECHO_OUT, qos)
    times: List[float] = []

    def on_image(msg):
        t0 = time.perf_counter()
        pub.publish(msg)
        times.append(time.perf_counter() - t0)
    node.create_subscription(image_cls, ECHO_IN, on_image, qos)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        Path(args.log).write_text(json.dumps({"callback": times}))
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


def _child_node(args) -> int:
    """The tracking node as `hqsmem node` runs it, plus a per-frame timing log written at exit."""
    import rclpy
    from hqsmem_ros.ros.main import _params_file, prefer_short_gil_slices, reuse_large_buffers, spin_until_shutdown
    from hqsmem_ros.ros.node import HQSMemNode
    prefer_short_gil_slices()  # as `hqsmem node` does
    reuse_large_buffers()
    from hqsmem_ros.ros.spinning import init_without_ros_signal_handlers
    init_without_ros_signal_handlers(["bench_node", "--ros-args", "--params-file", _params_file(args.config)]
                                     + list(args.ros_args))
    node = HQSMemNode(NODE_NAME)
    node.frame_log = []
    try:
        spin_until_shutdown(node)
    finally:
        node.stop()
        Path(args.log).write_text(json.dumps({"frames": node.frame_log, "counters": node.counters()}))
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


def _machine(load_before) -> Dict:
    """Other programs on the machine change every wall-clock figure here: say how busy it was."""
    return {"cpus": os.cpu_count(), "load_avg_1min_before": round(load_before[0], 2),
            "load_avg_1min_after": round(os.getloadavg()[0], 2)}


def _machine_line(r: Dict) -> str:
    m = r["machine"]
    return (f"  machine: {m['cpus']} CPUs, 1-min load average {m['load_avg_1min_before']:.1f} before, "
            f"{m['load_avg_1min_after']:.1f} after")


# ---------------------------------------------------------------------------------- stream
_STOPPED = re.compile(r"stopped: (\d+) frames received, (\d+) processed, dropped (.*)$", re.M)


# Over 80 lines on purpose: the publisher loop and the settle wait share a dozen counters that a
# split would pass back and forth.
def run_stream(args, qos_name: str) -> Dict:
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from hqsmem_ros.msg import TrackedObjectArray
    image_cls, image_topic, input_type = _image_class(args.encoding)

    domain = _domain(args.domain)
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain))
    frames, labels, order = _frames(args.size, args.cycle, args.objects, args.seed)
    msgs = _image_msgs(frames, args.encoding)
    tmp = tempfile.mkdtemp(prefix=f"hqsmem_bench_stream_{qos_name}_")
    mask_png = _write_label_png(labels[0], tmp)
    node_out = os.path.join(tmp, "node.out")
    cmd = [sys.executable, "-m", "hqsmem_ros.cli", "node", "--config", args.config, "--ros-args",
           "-p", f"qos_reliability:={qos_name}", "-p", f"initial_mask:={mask_png}",
           "-p", f"input_type:={input_type}"]
    if args.node_depth:
        cmd += ["-p", f"qos_depth:={args.node_depth}"]
    node_proc = subprocess.Popen(cmd, env=env, stdout=open(node_out, "w"), stderr=subprocess.STDOUT)
    driver = _Driver(domain)
    results: Dict[int, int] = {}
    diag: Dict[str, str] = {}
    published: List[int] = []
    late = 0
    try:
        reliability = ReliabilityPolicy.RELIABLE if qos_name == "reliable" else ReliabilityPolicy.BEST_EFFORT
        n = driver.node
        pub = n.create_publisher(image_cls, image_topic, QoSProfile(depth=args.depth, reliability=reliability))

        def on_result(msg):
            results[_key(msg)] = results.get(_key(msg), 0) + 1

        def on_diag(msg):
            for st in msg.status:
                if st.name.startswith(f"/{NODE_NAME}:"):
                    diag.clear()
                    diag.update({kv.key: kv.value for kv in st.values})
        n.create_subscription(TrackedObjectArray, f"/{NODE_NAME}/objects", driver.record("objects", on_result),
                              QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
        n.create_subscription(DiagnosticArray, "/diagnostics", driver.record("diag", on_diag), 10)
        driver.start()
        _wait(lambda: pub.get_subscription_count() and n.count_publishers(f"/{NODE_NAME}/objects")
              and n.count_publishers("/diagnostics"), 60, "discovery", node_proc)
        time.sleep(1.0)
        period = 1.0 / args.rate
        t_start = next_time = time.monotonic()
        rss: List[List[float]] = []  # [seconds since the first frame, node RSS in MB]
        node_ps = psutil.Process(node_proc.pid)
        next_rss = t_start
        for k in range(args.frames):
            if time.monotonic() >= next_rss:
                rss.append([round(time.monotonic() - t_start, 1), round(node_ps.memory_info().rss / 2**20, 1)])
                next_rss += args.rss_every
            next_time += period
            delay = next_time - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -period:  # the publisher was held up: go on from now, as a camera would,
                late += 1          # instead of sending the missed frames in a burst
                next_time = time.monotonic()
            msg = msgs[order[k % len(order)]]
            ns = _stamp_ns(k, args.rate)
            _set_stamp(msg, ns)
            pub.publish(msg)
            published.append(ns)
            if not args.quiet and (k + 1) % 500 == 0:
                with driver.cv:
                    print(f"  [{qos_name}] {k + 1}/{args.frames} published, {len(results)} results, "
                          f"node: received {diag.get('frames_received')}, dropped {diag.get('frames_dropped')}",
                          file=sys.stderr)
        elapsed = time.monotonic() - t_start
        rss.append([round(elapsed, 1), round(node_ps.memory_info().rss / 2**20, 1)])

        def settled():
            with driver.cv:
                if not diag:
                    return False
                rec, proc_, drop = (int(diag[k]) for k in ("frames_received", "frames_processed", "frames_dropped"))
                return (diag.get("frames_pending") == "0" and proc_ + drop == rec
                        and len(results) == proc_ and time.monotonic() - last_change[0] > 3.0)
        last_change = [time.monotonic()]
        last_seen = [None]

        def watch():
            with driver.cv:
                now = (diag.get("frames_received"), diag.get("frames_processed"), len(results))
            if now != last_seen[0]:
                last_seen[0], last_change[0] = now, time.monotonic()
            return settled()
        try:
            _wait(watch, 60, "the node to account for every frame it received", node_proc)
        except SystemExit as exc:
            print(str(exc), file=sys.stderr)
        with driver.cv:
            final_diag = dict(diag)
            got = dict(results)
    finally:
        driver.close()
        _stop(node_proc)
    out = Path(node_out).read_text(errors="replace")
    stopped = _STOPPED.search(out)
    sent = set(published)
    dropped = {k[len("dropped."):]: int(v) for k, v in final_diag.items() if k.startswith("dropped.")}
    received = int(final_diag.get("frames_received", -1))
    processed = int(final_diag.get("frames_processed", -1))
    # The node's own count: gaps in the publisher's sequence numbers (or the middleware's
    # message-lost event where sequence numbers are not available).
    lost_counted = int(final_diag.get("messages_lost_in_transport", 0))
    report = {
        "qos": qos_name, "size": f"{args.size[0]}x{args.size[1]}", "encoding": args.encoding,
        "rate_hz": args.rate, "publisher_depth": args.depth, "node_depth": args.node_depth or "from config",
        "config": str(args.config),
        "published": len(published), "publish_seconds": elapsed, "late_publishes": late,
        "node_received": received, "node_processed": processed, "node_dropped": dropped,
        "node_dropped_total": sum(dropped.values()),
        "results_received": len(got), "results_duplicated": sum(c - 1 for c in got.values()),
        "results_not_published": len(set(got) - sent),
        "lost_in_transport": len(published) - received,
        "lost_counted_by_node": lost_counted,
        "node_stopped_line": stopped.group(0) if stopped else None,
        "transport": args.transport_line, "node_rss_mb": rss,
        "rss_change_after_first_minute_pct": _rss_change(rss, 60.0),
        "node_log": node_out if args.keep_logs else None, "command": " ".join(cmd),
    }
    if not args.keep_logs:
        shutil.rmtree(tmp, ignore_errors=True)
    report["node_accounts_for_received"] = processed + report["node_dropped_total"] == received
    report["results_equal_processed"] = len(got) == processed
    report["published_equals_results_plus_drops"] = len(published) == len(got) + report["node_dropped_total"]
    report["transport_losses_counted_by_node"] = report["lost_in_transport"] == lost_counted
    # Every frame is accounted for by the node: a result, a counted drop, or a counted loss.
    report["every_frame_accounted"] = (report["node_accounts_for_received"] and report["results_equal_processed"]
                                       and len(published) == len(got) + report["node_dropped_total"] + lost_counted)
    return report


def _rss_change(rss: List[List[float]], after_s: float) -> Optional[float]:
    """Largest departure (%) of the node's RSS from its value at `after_s` seconds, from then on."""
    later = [mb for t, mb in rss if t >= after_s]
    if len(later) < 2:
        return None
    return round(100.0 * max(abs(mb - later[0]) for mb in later) / later[0], 2)


def format_stream(r: Dict) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in sorted(r["node_dropped"].items())) or "none"
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    lines = [
        f"stream [{r['qos']}]: {r['size']} {r['encoding']} at {r['rate_hz']:g} Hz, "
        f"history depth publisher {r['publisher_depth']} / node {r['node_depth']}, "
        f"{r['published']} frames published in {r['publish_seconds']:.1f} s "
        f"(schedule slipped by more than a period {r['late_publishes']} times)",
        f"  node received {r['node_received']}, processed {r['node_processed']}, dropped {r['node_dropped_total']} ({drops})",
        f"  results received by the subscriber: {r['results_received']} "
        f"(duplicates {r['results_duplicated']}, unknown stamps {r['results_not_published']})",
        f"  lost between the processes (published - received; seen only by the publisher): "
        f"{r['lost_in_transport']}; counted by the node (sequence gaps): {r['lost_counted_by_node']}",
        f"  node: received == processed + dropped: {yes(r['node_accounts_for_received'])};  "
        f"results == processed: {yes(r['results_equal_processed'])}",
        f"  published == results + the node's drops (nothing lost in transport): "
        f"{yes(r['published_equals_results_plus_drops'])}",
    ]
    if r["lost_in_transport"]:
        lines.append("  transport losses counted by the node: "
                     f"{yes(r['transport_losses_counted_by_node'])}")
    lines.append("  every frame accounted for by the node: result, drop or counted loss (exit status 0): "
                 f"{yes(r['every_frame_accounted'])}")
    published = max(1, r["published"])
    lines.append(f"  lost in transport: {100.0 * r['lost_in_transport'] / published:.2f} % of published; "
                 f"DDS transport: {r['transport']}")
    samples = r["node_rss_mb"]
    step = max(1, len(samples) // 12)
    lines.append("  node RSS over time (s: MB): " + ", ".join(f"{t:g}: {mb:g}" for t, mb in samples[::step]
                                                            + ([samples[-1]] if (len(samples) - 1) % step else [])))
    change = r["rss_change_after_first_minute_pct"]
    lines.append("  RSS after the first minute: " + (f"within {change:.2f} % of its value at 60 s" if change is not None
                                                    else "run shorter than a minute"))
    lines.append(_machine_line(r))
    if r["node_stopped_line"]:
        lines.append(f"  node at exit: {r['node_stopped_line']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["_echo"], ["_node"]):  # child processes started by the commands below
        ap = argparse.ArgumentParser()
        ap.add_argument("role")
        ap.add_argument("--log", required=True)
        ap.add_argument("--config", default=str(DEFAULT_CONFIG))
        ap.add_argument("--encoding", default="bgr8")
        ours, ros = (argv[:argv.index("--ros-args")], argv[argv.index("--ros-args"):]) \
            if "--ros-args" in argv else (argv, [])
        args = ap.parse_args(ours)
        args.ros_args = ros
        return _child_echo(args) if args.role == "_echo" else _child_node(args)

    ap = argparse.ArgumentParser(prog="python -m hqsmem_ros.tools.bench_node", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, size, frames in (("overhead", (1280, 720), 300), ("stream", (320, 240), 5000)):
        p = sub.add_parser(name)
        p.add_argument("--size", type=_size, default=size)
        p.add_argument("--frames", type=int, default=frames)
        p.add_argument("--config", default=str(DEFAULT_CONFIG), help="node parameter file")
        p.add_argument("--encoding", choices=["bgr8", "rgb8", "jpeg"], default="bgr8",
                       help="input encoding (bgr8: what most camera drivers publish; jpeg: "
                            f"CompressedImage at quality {JPEG_QUALITY} on image/compressed)")
        p.add_argument("--objects", type=int, default=3)
        p.add_argument("--cycle", type=int, default=40, help="distinct synthetic frames (played back and forth)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--domain", type=int, help="ROS_DOMAIN_ID (default: $ROS_DOMAIN_ID or from the pid)")
        p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
        p.add_argument("--quiet", action="store_true")
        p.add_argument("--keep-logs", action="store_true", help="keep the child processes' logs (path in the JSON)")
    sub.choices["overhead"].add_argument("--warmup", type=int, default=20)
    sub.choices["overhead"].add_argument("--target-ms", type=float, default=3.0)
    sub.choices["stream"].add_argument("--rate", type=float, default=30.0)
    sub.choices["stream"].add_argument("--qos", choices=["reliable", "best_effort", "both"], default="both")
    sub.choices["stream"].add_argument("--depth", type=int, default=5, help="publisher history depth")
    sub.choices["stream"].add_argument("--rss-every", type=float, default=5.0,
                                       help="seconds between samples of the node's RSS")
    for name in ("overhead", "stream"):
        sub.choices[name].add_argument(
            "--transport", choices=["shipped", "defaults"], default="shipped",
            help="DDS transport settings of every process: shipped = config/fastdds.xml (as `hqsmem "
                 "node` and the tools use them), defaults = Fast DDS's own (HQSMEM_DDS_DEFAULTS=1)")
    sub.choices["stream"].add_argument("--node-depth", type=int,
                                       help="the node's qos_depth (default: the config file's)")
    args = ap.parse_args(argv)
    args.config = str(Path(args.config).resolve())
    from hqsmem_ros.ros import dds_transport
    if args.transport == "defaults":
        os.environ[dds_transport.OPT_OUT_ENV] = "1"
    args.transport_line = dds_transport.apply()  # this process (the driver) and the children

    load_before = os.getloadavg()
    if args.command == "overhead":
        from hqsmem_ros.tools.bench_overhead import format_overhead, run_overhead
        report = run_overhead(args)
        report["machine"] = _machine(load_before)
        print(format_overhead(report))
        ok = report["target_met"]
    else:
        reports = []
        for qos in (["reliable", "best_effort"] if args.qos == "both" else [args.qos]):
            reports.append(run_stream(args, qos))
            reports[-1]["machine"] = _machine(load_before)
            load_before = os.getloadavg()
            print(format_stream(reports[-1]), flush=True)
        report = {"runs": reports}
        ok = all(r["every_frame_accounted"] for r in reports)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
