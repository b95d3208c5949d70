"""What 3D outputs add to the node per frame: HQSMemNode with use_depth against the same node
without, on the same synthetic RGB-D frames, in one run (`python -m hqsmem_ros.tools.bench_depth node`).

Both nodes are the real HQSMemNode over real DDS (Fast DDS, a private domain); a client in a
process of its own publishes each frame (with depth: its depth image and camera_info first, waited for until
the node holds them, so pairing never waits) and waits for its ~/objects (and ~/points) before
the next, so no frame queues. (With the client in the node's process its executor's Python work
for the extra ~/points message competed for the GIL and added 1-1.5 ms of wall time that a
subscriber elsewhere does not cost the node.) The client subscribes to ~/masks, ~/objects and (with depth) ~/points, so
everything is built. Per frame the node's own record (frame_log) gives `overhead`: its wall time
from the callback to the last publish, the pipeline excluded (decode, 3D, message building,
publishing), and `overhead_cpu`, the same as CPU time of the processing thread. Rounds alternate
the two nodes (A B A B ...), each a fresh node over the same frames, so a load change on a shared
machine hits both; the figure is the difference of the medians over all rounds.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from typing import Dict, List

import numpy as np


def _client(conn, domain: int, frames: int, size, n_objects: int, seed: int) -> None:
    """The camera and the subscriber, in a process of their own (so their Python work never
    shares the node's GIL). Commands from the parent: ("round", mode), ("depth", k),
    ("image", k) -> "ok" once ~/objects (and with depth ~/points) of frame k arrived, ("end",)."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    from hqsmem_ros.data.synth_rgbd import make_rgbd
    from hqsmem_ros.io import image_codec
    from hqsmem_ros.msg import TrackedObjectArray
    from hqsmem_ros.ros.spinning import BackgroundSpinner
    from hqsmem_ros.tools.synthetic_rgbd_camera import _image, camera_info_msg

    data = make_rgbd(seed, size, frames, n_objects)
    msgs = []
    for k, f in enumerate(data):
        t = 1000.0 + k / 30.0
        img = image_codec.fill_image_msg(Image(), image_codec.encode_image(np.ascontiguousarray(f.rgb[..., ::-1]), "bgr8"))
        img.header.stamp.sec, img.header.stamp.nanosec = divmod(int(round(t * 1e9)), 1_000_000_000)
        img.header.frame_id = "camera_color_optical_frame"
        msgs.append((img, _image(f.depth_mm, "16UC1", "camera_color_optical_frame", t),
                     camera_info_msg(size[0], size[1], "camera_color_optical_frame", t)))
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node("bench_client", context=ctx)
    cv = threading.Condition()
    got = {"objects": 0, "points": 0, "point_bytes": 0}

    def on(key):
        def cb(msg):  # serialized (raw): counted, not parsed
            with cv:
                got[key] += 1
                if key == "points":
                    got["point_bytes"] += len(msg)
                cv.notify_all()
        return cb
    node.create_subscription(TrackedObjectArray, "/hqsmem_node/objects", on("objects"), 100, raw=True)
    node.create_subscription(Image, "/hqsmem_node/masks", lambda m: None, 100, raw=True)
    node.create_subscription(PointCloud2, "/hqsmem_node/points", on("points"), 100, raw=True)
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    pub_img = node.create_publisher(Image, "image", qos)
    pub_depth = node.create_publisher(Image, "depth", qos)
    pub_info = node.create_publisher(CameraInfo, "depth/camera_info", qos)
    ex = MultiThreadedExecutor(num_threads=2, context=ctx)
    ex.add_node(node)
    spin = BackgroundSpinner(ex).start()
    mode = "2d"
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "end":
                conn.send(got["point_bytes"])
                return
            if cmd[0] == "round":
                mode = cmd[1]
                with cv:
                    got["objects"] = got["points"] = 0
                _until(lambda: pub_img.get_subscription_count() > 0 and (mode == "2d" or pub_depth.get_subscription_count() > 0),
                       60, "the node's subscriptions")
                conn.send("ok")
            elif cmd[0] == "depth":
                img, depth, info = msgs[cmd[1]]
                pub_info.publish(info)
                pub_depth.publish(depth)
            elif cmd[0] == "image":
                k = cmd[1]
                pub_img.publish(msgs[k][0])
                with cv:
                    ok = cv.wait_for(lambda: got["objects"] > k and (mode == "2d" or got["points"] > k), 60)
                conn.send("ok" if ok else "timeout")
    finally:
        spin.stop()
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def run_node_bench(frames: int, size, n_objects: int, seed: int, rounds: int, config: str) -> Dict:
    import multiprocessing
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from hqsmem_ros.data.synth_rgbd import make_rgbd
    from hqsmem_ros.malloc_tuning import reuse_large_buffers
    from hqsmem_ros.ros.main import prefer_short_gil_slices
    from hqsmem_ros.ros.node import HQSMemNode
    from hqsmem_ros.ros.spinning import BackgroundSpinner
    from PIL import Image as PILImage

    prefer_short_gil_slices()  # as `hqsmem node` runs the node
    reuse_large_buffers()
    label0 = make_rgbd(seed, size, 1, n_objects)[0].label
    tmp = tempfile.mkdtemp(prefix="bench_depth_node_")
    mask = os.path.join(tmp, "initial.png")
    PILImage.fromarray(label0.astype(np.uint8)).save(mask)
    domain = 1 + (os.getpid() + 131) % 200
    parent, child = multiprocessing.get_context("spawn").Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_client, args=(child, domain, frames, size, n_objects, seed),
                                                        daemon=True)
    proc.start()

    def ask(*cmd):
        parent.send(cmd)
        if not parent.poll(120):
            raise RuntimeError(f"the client process did not answer {cmd[0]}")
        answer = parent.recv()
        if answer == "timeout":
            raise RuntimeError(f"no result for frame {cmd[1]}")
        return answer

    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    keys = ("overhead", "overhead_cpu", "depth3d", "pipeline", "wait", "decode", "publish", "points")
    per_mode: Dict[str, Dict[str, List[float]]] = {m: {k: [] for k in keys} for m in ("2d", "3d")}
    try:
        for r in range(2 * rounds):
            mode = "3d" if r % 2 else "2d"
            params = {"initial_mask": mask, "qos_reliability": "reliable", "qos_depth": 100, "frame_queue_size": 100,
                      "publish_overlay": False, "use_depth": mode == "3d"}
            node = HQSMemNode("hqsmem_node", context=ctx, parameter_overrides=[
                Parameter(k, value=v) for k, v in params.items()])
            node.frame_log = []
            ex = MultiThreadedExecutor(num_threads=4, context=ctx)
            ex.add_node(node)
            spin = BackgroundSpinner(ex).start()
            try:
                ask("round", mode)
                _until(lambda: node.objects_pub.get_subscription_count() > 0 and node.masks_pub.get_subscription_count() > 0
                       and (mode == "2d" or node.points_pub.get_subscription_count() > 0), 60, "discovery")
                for k in range(frames):
                    if mode == "3d":
                        d3 = node.session.depth
                        n = d3.pairer.counts["depth_received"]
                        parent.send(("depth", k))
                        _until(lambda: d3.pairer.counts["depth_received"] > n and d3.intrinsics is not None, 60, "depth")
                    ask("image", k)
                rec = node.frame_log[1:]  # the first frame seeds the objects
                for key in keys:
                    per_mode[mode][key] += [x.get(key, 0.0) for x in rec]
                if mode == "3d":
                    c = node.counters()["depth"]
                    if c["frames_3d"] != frames:
                        raise RuntimeError(f"only {c['frames_3d']} of {frames} frames had 3D: {c}")
            finally:
                spin.stop()
                node.destroy_node()
        parent.send(("end",))
        point_bytes = parent.recv() if parent.poll(60) else 0
    finally:
        rclpy.shutdown(context=ctx)
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()

    return _summary(per_mode, frames, size, n_objects, rounds, point_bytes)


def _summary(per_mode, frames: int, size, n_objects: int, rounds: int, point_bytes: int) -> Dict:
    """Medians per mode (2d, 3d) and what 3D adds, against the 2 ms target."""
    def med(values):
        return round(1000 * statistics.median(values), 3)
    n_clouds = frames * rounds
    out = {"frames": frames, "size": f"{size[0]}x{size[1]}", "objects": n_objects, "rounds": rounds,
           "load_avg": [round(v, 2) for v in os.getloadavg()],
           "points_per_frame": round(float(np.mean(per_mode["3d"]["points"]))),
           "cloud_bytes_per_frame": round(point_bytes / n_clouds)}
    for mode, vals in per_mode.items():
        out[mode] = {f"{k}_median_ms": med(v) for k, v in vals.items() if k != "points"}
        out[mode]["overhead_mean_ms"] = round(1000 * float(np.mean(vals["overhead"])), 3)
    out["added_median_ms"] = round(out["3d"]["overhead_median_ms"] - out["2d"]["overhead_median_ms"], 3)
    out["added_cpu_median_ms"] = round(out["3d"]["overhead_cpu_median_ms"] - out["2d"]["overhead_cpu_median_ms"], 3)
    out["target_ms"] = 2.0
    out["met"] = out["added_median_ms"] <= 2.0
    return out


def _until(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def format_node_bench(out: Dict) -> str:
    a, b = out["2d"], out["3d"]
    return "\n".join([
        f"node with 3D vs without, {out['size']}, {out['objects']} objects, {out['frames']} frames x {out['rounds']} "
        f"rounds each (alternating), load average {out['load_avg']}",
        f"  without depth: node overhead median {a['overhead_median_ms']} ms/frame (CPU {a['overhead_cpu_median_ms']}), "
        f"pipeline {a['pipeline_median_ms']} ms",
        f"  with depth:    node overhead median {b['overhead_median_ms']} ms/frame (CPU {b['overhead_cpu_median_ms']}), "
        f"of which 3D {b['depth3d_median_ms']} ms; pipeline {b['pipeline_median_ms']} ms; ~/points "
        f"{out['points_per_frame']} points/frame",
        "  medians ms (without / with depth): " + ", ".join(
            f"{k} {a[k + '_median_ms']} / {b[k + '_median_ms']}" for k in ("wait", "decode", "publish")),
        f"  added by 3D outputs: {out['added_median_ms']} ms/frame (CPU {out['added_cpu_median_ms']}); target "
        f"<= {out['target_ms']} ms: {'met' if out['met'] else 'NOT met'}"])
