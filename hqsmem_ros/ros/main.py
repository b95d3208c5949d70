"""`hqsmem node [--config FILE] [--lifecycle] [--ros-args ...]` and the `hqsmem_node` executable of the ROS package.

--lifecycle runs the managed (lifecycle) node: it starts unconfigured and is driven through
~/change_state (`ros2 lifecycle set /hqsmem_node configure`, then `activate`; launch's
`lifecycle:=true autostart:=true` does both).

--config takes a ROS 2 parameter file (like config/track.yaml) or a plain mapping of pipeline
keys; everything after --ros-args goes to ROS as usual (remappings, -p name:=value, ...).
"""
from __future__ import annotations

import argparse
import faulthandler
import sys
from typing import List, Optional

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
    """A ROS parameter file for `path`: itself, or a temporary wrapper around a plain mapping
    (LaunchArgumentError, a ValueError, naming the file and the expected formats otherwise)."""
    from hqsmem_ros.launch_params import ros_params_file

    return ros_params_file(path)


def check_parameters(config: Optional[str], ros_args: List[str], node_name: str) -> None:
    """Every key of the --config file, of --params-file files and of -p overrides is one the
    node knows, of the right type (ConfigError naming the key and its file, before ROS starts)."""
    from hqsmem_ros.core.config_check import check_node_parameters, collect_node_parameters
    from hqsmem_ros.ros.node import NODE_PARAMS

    check_node_parameters(collect_node_parameters(config, ros_args, node_name),
                          {name: p.default for name, p in NODE_PARAMS.items()})


class _ConsoleLogger:
    """The node's last line once ROS is shut down: printed like a ROS log line, not sent to
    /rosout (whose publisher belongs to the gone context)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def info(self, text: str) -> None:
        print(f"[INFO] [{self.name}]: {text}", file=sys.stderr, flush=True)


def spin_until_shutdown(node, stop=None) -> None:
    """Spin the node as `hqsmem node` does until `stop` is set (SIGINT/SIGTERM, see
    spinning.stop_on_signals) or an external shutdown; then stop it (waking service callbacks
    that wait for a frame) and wait for the executor's threads, so that no callback runs while
    the node is destroyed (destroying it under a running callback crashed the process now and
    then: SIGSEGV). ROS must have been initialised with init_without_ros_signal_handlers()."""
    from hqsmem_ros.ros.spinning import spin_until_signal

    spin_until_signal(node, num_threads=6, before_stop=node.stop, stop=stop)  # processing, intake, waiting services


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
    parser.add_argument("--lifecycle", action="store_true",
                        help="run as a lifecycle node (unconfigured at start; configure loads the models, "
                             "activate subscribes, deactivate pauses, cleanup frees the models)")
    args = parser.parse_args(ours)
    # A crash in native code (DDS, rclpy's C extension) prints every thread's Python stack to
    # stderr (the launch log) instead of a bare exit -11: one such exit was seen at a SIGTERM.
    faulthandler.enable()

    try:
        import rclpy
    except ImportError as exc:
        print(f"hqsmem node: ROS 2 (rclpy) is not importable: {exc}\n"
              "On a machine without ROS, run scripts/setup_ros.sh; on a robot, source your ROS 2 "
              "setup and the workspace's install/setup.bash.", file=sys.stderr)
        return 2
    from hqsmem_ros.core.config import ConfigError
    from hqsmem_ros.launch_params import LaunchArgumentError

    try:
        params_file = _params_file(args.config) if args.config else None  # its format first
        check_parameters(args.config, ros_args, args.name)
        if params_file:
            # The file first, so that -p name:=value given after --ros-args overrides it.
            ros_args = ["--ros-args", "--params-file", params_file] + ros_args[1:]
    except (ConfigError, LaunchArgumentError) as exc:
        print(f"hqsmem node: {exc}", file=sys.stderr)
        return 2

    prefer_short_gil_slices()
    reuse_large_buffers()
    from hqsmem_ros.ros import dds_transport
    transport = dds_transport.apply()  # before the DDS participant exists (rclpy.init)
    from hqsmem_ros.ros.spinning import init_without_ros_signal_handlers, stop_on_signals
    with stop_on_signals() as stop:  # from here on: a signal while the models load stops it cleanly too
        init_without_ros_signal_handlers([sys.argv[0] if sys.argv else "hqsmem_node"] + ros_args)
        return _run(args, transport, stop)


def _run(args, transport: str, stop) -> int:
    """Build the node, spin it until `stop` is set, then log its counters and shut ROS down."""
    import rclpy

    from hqsmem_ros.core.config import ConfigError
    from hqsmem_ros.ros.lifecycle import HQSMemLifecycleNode
    from hqsmem_ros.ros.node import HQSMemNode

    node = None
    try:
        try:
            node = (HQSMemLifecycleNode if args.lifecycle else HQSMemNode)(args.name)
        except (ConfigError, ValueError) as exc:
            print(f"hqsmem node: {exc}", file=sys.stderr)
            return 2
        node.get_logger().info(f"DDS transport: {transport}")
        if args.lifecycle:
            node.get_logger().info("lifecycle node: unconfigured; `ros2 lifecycle set "
                                   f"{node.get_fully_qualified_name()} configure` loads the models")
        spin_until_shutdown(node, stop)
        return 0
    finally:
        if node is not None:
            node.stop()
            c = node.counters()
            # Logged while the node and its context are still valid: after an external shutdown
            # (SIGINT) the context is gone, and the line goes to the console only.
            logger = node.get_logger() if rclpy.ok() else _ConsoleLogger(node.get_logger().name)
            logger.info(f"stopped: {c['received']} frames received, {c['processed']} processed, "
                        f"dropped {c['dropped'] or 0}")
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    sys.exit(main())
