"""Large raw images between two processes over real Fast DDS with the shipped transport settings.

The synthetic camera (1280x720 rgb8) and `hqsmem node` run as two processes, each applying
config/fastdds.xml itself, as on a robot. The camera runs in lockstep (a frame only after the
node's result for the previous one) with reliable QoS, so nothing can be overwritten anywhere
and the test cannot flake; the settings are checked in the processes' own memory maps.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("rclpy", reason="ROS 2 not installed: run scripts/setup_ros.sh")

from hqsmem_ros.ros import dds_transport  # noqa: E402

FRAMES = 12
DOMAIN_ID = 1 + (os.getpid() + 101) % 200


def test_large_frames_between_two_processes_with_the_shipped_profile(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (
        dds_transport.PROFILE_ENV, dds_transport.LEGACY_PROFILE_ENV, dds_transport.OPT_OUT_ENV)}
    env["ROS_DOMAIN_ID"] = str(DOMAIN_ID)
    node = subprocess.Popen(
        [sys.executable, "-m", "hqsmem_ros.cli", "node", "--ros-args", "-p", "qos_reliability:=reliable",
         "-p", "frame_queue_size:=100", "-p", "qos_depth:=100"],
        env=env, stdout=open(tmp_path / "node.out", "w"), stderr=subprocess.STDOUT)
    camera = subprocess.Popen(
        [sys.executable, "-m", "hqsmem_ros.tools.synthetic_camera", "--ros-args", "-p", "width:=1280",
         "-p", "height:=720", "-p", f"frames:={FRAMES}", "-p", "encoding:=rgb8", "-p", "lockstep:=true",
         "-p", "lockstep_timeout:=60.0", "-p", "n_objects:=2"],
        env=env, stdout=open(tmp_path / "camera.out", "w"), stderr=subprocess.STDOUT)
    camera_segments, node_segments = [], []
    try:
        end = time.monotonic() + 240
        while camera.poll() is None:
            assert time.monotonic() < end, "the camera did not finish"
            assert node.poll() is None, (tmp_path / "node.out").read_text()
            camera_segments = dds_transport.shm_segment_sizes(camera.pid) or camera_segments
            node_segments = dds_transport.shm_segment_sizes(node.pid) or node_segments
            time.sleep(0.02)
        node_segments = dds_transport.shm_segment_sizes(node.pid) or node_segments
    finally:
        if camera.poll() is None:
            camera.kill()
        node.send_signal(signal.SIGINT)
        node.wait(timeout=60)
    camera_log, node_log = (tmp_path / "camera.out").read_text(), (tmp_path / "node.out").read_text()
    assert camera.returncode == 0, camera_log
    assert f"published {FRAMES} frames" in camera_log and "without a result" not in camera_log, camera_log
    assert node.returncode == 0, node_log
    m = re.search(r"stopped: (\d+) frames received, (\d+) processed, dropped (.*)", node_log)
    assert m and (int(m.group(1)), int(m.group(2))) == (FRAMES, FRAMES), node_log
    # the profile is what carried them: both processes hold 64 MB segments, no default-sized one
    assert "DDS transport: Fast DDS profile" in node_log and "fastdds.xml" in node_log, node_log
    for segments in (camera_segments, node_segments):
        assert segments and min(segments) >= dds_transport.SEGMENT_BYTES, segments
