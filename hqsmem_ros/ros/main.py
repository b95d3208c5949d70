"""`hqsmem node [--config FILE] [--ros-args ...]` and the `hqsmem_node` executable of the ROS package.

--config takes a ROS 2 parameter file (like config/track.yaml) or a plain mapping of pipeline
keys; everything after --ros-args goes to ROS as usual (remappings, -p name:=value, ...).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import yaml

from hqsmem_ros.malloc_tuning import reuse_large_buffers

# The node's worker thread runs the pipeline while an executor thread takes images off DDS. With
# Python's default 5 ms GIL switch interval the worker can hold off the executor long enough for
# the image subscription's history (qos_depth frames) to overflow, and DDS then overwrites frames
# the node never sees, so it cannot count them (measured in docs/benchmarks.md, "ROS 2 node").
# Shorter slices keep the intake responsive.
GIL_SWITCH_INTERVAL_S = 0.0005


def prefer_short_gil_slices() -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def _params_file(path: str) -> str:
    """A ROS parameter file for `path`: itself, or a temporary wrapper around a plain mapping."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"hqsmem node: config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SystemExit(f"hqsmem node: {path} is not valid YAML: {exc}")
    if not isinstance(data, dict):
        raise SystemExit(f"hqsmem node: {path} must hold a mapping")
    if any(isinstance(v, dict) and "ros__parameters" in v for v in data.values()):
        return str(p)
    # A plain pipeline config (the CLI's --config format): the node reads it as pipeline.*.
    wrapped = {"/**": {"ros__parameters": {"pipeline": data}}}
    fd, tmp = tempfile.mkstemp(prefix="hqsmem_params_", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(wrapped, f)
    return tmp


def spin_until_shutdown(node) -> None:
    """Spin the node as `hqsmem node` does until Ctrl-C or an external shutdown."""
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
    executor = MultiThreadedExecutor(num_threads=6)  # processing, intake, waiting services
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def _split(argv: List[str]):
    """(our args, ROS args): ROS args start at the first --ros-args."""
    if "--ros-args" in argv:
        k = argv.index("--ros-args")
        return argv[:k], argv[k:]
    return argv, []


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, ros_args = _split(argv)
    parser = argparse.ArgumentParser(
        prog="hqsmem node", description="Run the HQ-SMem tracking node (ROS 2).",
        epilog="Example: hqsmem node --config config/track.yaml --ros-args -r image:=/camera/image_raw")
    parser.add_argument("--config", "-c", help="parameter file (config/track.yaml format) or plain pipeline YAML")
    parser.add_argument("--name", default="hqsmem_node", help="node name (default: hqsmem_node)")
    args = parser.parse_args(ours)

    try:
        import rclpy
    except ImportError as exc:
        print(f"hqsmem node: ROS 2 (rclpy) is not importable: {exc}\n"
              "On a machine without ROS, run scripts/setup_ros.sh; on a robot, source your ROS 2 "
              "setup and the workspace's install/setup.bash.", file=sys.stderr)
        return 2
    if args.config:
        # The file first, so that -p name:=value given after --ros-args overrides it.
        ros_args = ["--ros-args", "--params-file", _params_file(args.config)] + ros_args[1:]

    from hqsmem_ros.core.config import ConfigError
    from hqsmem_ros.ros.node import HQSMemNode

    prefer_short_gil_slices()
    reuse_large_buffers()
    rclpy.init(args=[sys.argv[0] if sys.argv else "hqsmem_node"] + ros_args)
    node = None
    try:
        try:
            node = HQSMemNode(args.name)
        except (ConfigError, ValueError) as exc:
            print(f"hqsmem node: {exc}", file=sys.stderr)
            return 2
        spin_until_shutdown(node)
        return 0
    finally:
        if node is not None:
            node.stop()
            c = node.counters()
            node.get_logger().info(
                f"stopped: {c['received']} frames received, {c['processed']} processed, "
                f"dropped {c['dropped'] or 0}")
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    sys.exit(main())
