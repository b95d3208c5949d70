"""`bench_node overhead`: the tracking node's own per-frame cost against a bare echo node.

Three processes: this driver, a bare rclpy node that only republishes each image (the
reference), and the tracking node as `hqsmem node` builds it. The driver sends each frame to
both, one at a time, and waits for the echo and for the node's ~/masks and ~/objects (lockstep,
reliable QoS). The node logs per frame, inside itself, the time from its image callback to its
last publish and the pipeline's own time, which is subtracted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

from hqsmem_ros.tools.bench_node import (ECHO_IN, ECHO_OUT, NODE_NAME, _Driver, _domain, _fmt, _frames,
                                         _image_class, _image_msgs, _machine_line, _ms, _set_stamp,
                                         _stamp_ns, _stop, _wait, _write_label_png)


def run_overhead(args) -> Dict:
    image_cls, image_topic, input_type = _image_class(args.encoding)
    domain = _domain(args.domain)
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain))
    frames, labels, order = _frames(args.size, args.cycle, args.objects, args.seed)
    msgs = _image_msgs(frames, args.encoding)
    tmp = tempfile.mkdtemp(prefix="hqsmem_bench_node_")
    mask_png = _write_label_png(labels[0], tmp)
    node_log, echo_log = os.path.join(tmp, "node.json"), os.path.join(tmp, "echo.json")
    me = [sys.executable, "-m", "hqsmem_ros.tools.bench_node"]
    node_proc = subprocess.Popen(
        me + ["_node", "--log", node_log, "--config", args.config, "--ros-args",
              "-p", "qos_reliability:=reliable", "-p", "qos_depth:=10", "-p", f"initial_mask:={mask_png}",
              "-p", f"input_type:={input_type}"],
        env=env, stdout=open(os.path.join(tmp, "node.out"), "w"), stderr=subprocess.STDOUT)
    echo_proc = subprocess.Popen(me + ["_echo", "--log", echo_log, "--encoding", args.encoding], env=env,
                                 stdout=open(os.path.join(tmp, "echo.out"), "w"), stderr=subprocess.STDOUT)
    driver = _Driver(domain)
    try:
        deserialize_s, echo_lat, node_lat, timeouts = _drive(args, driver, image_cls, image_topic, msgs, order,
                                                             node_proc)
    finally:
        driver.close()
        _stop(node_proc)
        _stop(echo_proc)
    if node_proc.returncode != 0:
        raise SystemExit(f"bench_node: the node process failed; see {tmp}/node.out")
    report = _report(args, domain, json.loads(Path(node_log).read_text()),
                     json.loads(Path(echo_log).read_text()), echo_lat, node_lat, timeouts, deserialize_s)
    report["logs"] = tmp if args.keep_logs else None
    if not args.keep_logs:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _drive(args, driver, image_cls, image_topic, msgs, order, node_proc):
    """Lockstep: each frame to the echo and to the node in turn (alternating which goes first).
    Returns (rclpy's deserialization time, echo and node round trips by stamp, timeouts)."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image
    from hqsmem_ros.msg import TrackedObjectArray
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    n = driver.node
    echo_pub = n.create_publisher(image_cls, ECHO_IN, qos)
    node_pub = n.create_publisher(image_cls, image_topic, qos)
    n.create_subscription(image_cls, ECHO_OUT, driver.record("echo"), qos)
    n.create_subscription(Image, f"/{NODE_NAME}/masks", driver.record("masks"), qos)
    n.create_subscription(TrackedObjectArray, f"/{NODE_NAME}/objects", driver.record("objects"), qos)
    driver.start()
    _wait(lambda: echo_pub.get_subscription_count() and node_pub.get_subscription_count()
          and n.count_publishers(ECHO_OUT) and n.count_publishers(f"/{NODE_NAME}/objects")
          and n.count_publishers(f"/{NODE_NAME}/masks"), 60, "discovery", node_proc)
    time.sleep(1.0)  # matching settles in both directions

    # The receive-side conversion rclpy does before any callback (both nodes pay it).
    raw = serialize_message(msgs[0])
    t0 = time.perf_counter()
    for _ in range(20):
        deserialize_message(raw, image_cls)
    deserialize_s = (time.perf_counter() - t0) / 20

    echo_lat: Dict[int, float] = {}
    node_lat: Dict[int, float] = {}
    timeouts = {"echo": 0, "node": 0}
    total = args.warmup + args.frames
    for k in range(total):
        msg = msgs[order[k % len(order)]]
        ns = _stamp_ns(k, 30.0)
        _set_stamp(msg, ns)
        legs = [("echo", echo_pub, ("echo",)), ("node", node_pub, ("masks", "objects"))]
        for name, pub, waits in (legs if k % 2 == 0 else legs[::-1]):
            t0 = time.perf_counter()
            pub.publish(msg)
            t1 = driver.wait_all(waits, ns, timeout=10.0)
            if t1 is None:
                timeouts[name] += 1
            elif k >= args.warmup:
                (echo_lat if name == "echo" else node_lat)[ns] = t1 - t0
        if not args.quiet and (k + 1) % 100 == 0:
            print(f"  {k + 1}/{total} frames", file=sys.stderr)
    return deserialize_s, echo_lat, node_lat, timeouts


def _report(args, domain, node_data, echo_data, echo_lat, node_lat, timeouts, deserialize_s) -> Dict:
    per_frame = {int(round(r["stamp"] * 1e9)): r for r in node_data["frames"]}
    common = [ns for ns in node_lat if ns in per_frame]
    e2e_minus_pipeline = [node_lat[ns] - per_frame[ns]["pipeline"] for ns in common]
    in_node = [per_frame[ns]["overhead"] for ns in common]
    stages = {s: _ms([per_frame[ns][s] for ns in common]) for s in ("wait", "decode", "publish", "pipeline")}
    other = [per_frame[ns]["overhead"] - per_frame[ns]["wait"] - per_frame[ns]["decode"] - per_frame[ns]["publish"]
             for ns in common]
    stages["other"] = _ms(other)
    report = {
        "size": f"{args.size[0]}x{args.size[1]}", "encoding": args.encoding, "frames": len(common),
        "warmup": args.warmup, "objects": args.objects, "config": str(args.config), "domain": domain,
        "timeouts": timeouts,
        "echo_round_trip_ms": _ms(list(echo_lat.values())),
        "node_round_trip_ms": _ms([node_lat[ns] for ns in common]),
        "node_round_trip_minus_pipeline_ms": _ms(e2e_minus_pipeline),
        "echo_callback_ms": _ms(echo_data["callback"][args.warmup:]),
        "node_overhead_in_node_ms": _ms(in_node),
        "node_overhead_cpu_ms": _ms([per_frame[ns]["overhead_cpu"] for ns in common]),
        "node_stage_ms": stages,
        "rclpy_deserialize_ms": 1000 * deserialize_s,
        "node_counters": node_data["counters"],
    }
    m_e2e, m_echo = report["node_round_trip_minus_pipeline_ms"], report["echo_round_trip_ms"]
    report["ratio_round_trip"] = m_e2e["median"] / m_echo["median"] if m_echo.get("n") and m_e2e.get("n") else None
    m_in, m_cb = report["node_overhead_in_node_ms"], report["echo_callback_ms"]
    report["ratio_in_node"] = m_in["median"] / m_cb["median"] if m_cb.get("n") and m_in.get("n") else None
    report["added_over_echo_ms"] = (m_e2e["median"] - m_echo["median"]) if report["ratio_round_trip"] else None
    report["target_ms"] = args.target_ms
    report["target_met"] = bool(m_in.get("n")) and m_in["median"] <= args.target_ms
    return report


def format_overhead(r: Dict) -> str:
    s = r["node_stage_ms"]
    lines = [
        f"ROS 2 node overhead: {r['size']} {r['encoding']}, {r['frames']} frames after {r['warmup']} warm-up, "
        f"{r['objects']} objects, lockstep, reliable QoS; driver, echo node and tracking node in 3 processes",
        f"  bare echo node, round trip (publish -> echoed image received):  {_fmt(r['echo_round_trip_ms'])}",
        f"  tracking node, round trip (publish -> masks+objects received): {_fmt(r['node_round_trip_ms'])}",
        f"    minus the pipeline's own time, per frame:                    {_fmt(r['node_round_trip_minus_pipeline_ms'])}",
        f"    ratio to the echo round trip (medians): {r['ratio_round_trip']:.2f}   "
        f"added over the echo: {r['added_over_echo_ms']:+.2f} ms",
        "  inside the processes (after rclpy's receive conversion):",
        f"    echo callback (publish the image):                           {_fmt(r['echo_callback_ms'])}",
        f"    tracking node, callback -> last publish, pipeline excluded:  {_fmt(r['node_overhead_in_node_ms'])}",
        f"      wait to be processed {s['wait'].get('median', 0):.2f}, decode {s['decode'].get('median', 0):.2f}, "
        f"publish masks+objects {s['publish'].get('median', 0):.2f}, other {s['other'].get('median', 0):.2f} "
        f"(medians, ms); pipeline itself {s['pipeline'].get('median', 0):.2f} ms",
        f"    ratio to the echo callback (medians): {r['ratio_in_node']:.2f}",
        f"    the same work as CPU time of the processing thread:          {_fmt(r['node_overhead_cpu_ms'])}",
        f"  rclpy's receive conversion of one {r['size']} image (both nodes pay it): {r['rclpy_deserialize_ms']:.2f} ms",
        f"  target: node overhead <= {r['target_ms']:g} ms per frame (in-node median): "
        + ("met" if r["target_met"] else "NOT met"),
    ]
    lines.append(_machine_line(r))
    if any(r["timeouts"].values()):
        lines.append(f"  frames without an answer within 10 s (warm-up included): {r['timeouts']}")
    return "\n".join(lines)
