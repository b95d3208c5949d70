"""What the launch file and `hqsmem node --config` make of their arguments (hqsmem_ros.launch_params)."""
import os

import pytest
import yaml

from hqsmem_ros.core.config import PipelineConfig, load_config
from hqsmem_ros.core.depth3d import DEPTH_NODE_PARAMS
from hqsmem_ros.launch_params import (LAUNCH_ARGUMENTS, LaunchArgumentError, depth_camera_info_topic, node_setup,
                                      ros_params_file)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACK = os.path.join(ROOT, "config", "track.yaml")


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def _rcl_reads(params_file, name):
    """The value rcl's own parameter-file parser gives `name` for a node started with the file."""
    import rclpy
    from rclpy.context import Context
    ctx = Context()
    rclpy.init(args=["x", "--ros-args", "--params-file", params_file], context=ctx)
    try:
        node = rclpy.create_node("hqsmem_node", context=ctx, automatically_declare_parameters_from_overrides=True)
        try:
            return node.get_parameter(name).value
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def test_a_ros_parameter_file_is_used_as_it_is():
    assert ros_params_file(TRACK) == TRACK


def test_a_plain_pipeline_mapping_becomes_a_parameter_file_rcl_reads(tmp_path):
    plain = _write(tmp_path, "plain.yaml", {"tau_verify": 0.8, "memory_capacity": 6, "tracker": {"type": "flow"}})
    with pytest.raises(Exception, match="ros__parameters"):  # what the node died of before
        _rcl_reads(plain, "tau_verify")
    out = ros_params_file(plain, str(tmp_path))
    assert out != plain and os.path.dirname(out) == str(tmp_path)
    assert _rcl_reads(out, "pipeline.tau_verify") == 0.8
    assert _rcl_reads(out, "pipeline.tracker.type") == "flow"
    cfg = load_config(out)
    assert (cfg.tau_verify, cfg.memory_capacity) == (0.8, 6)
    wrapped = ros_params_file(_write(tmp_path, "wrapped.yaml", {"pipeline": {"tau_memory": 0.7}}), str(tmp_path))
    assert load_config(wrapped).tau_memory == 0.7


@pytest.mark.parametrize("content, match", [
    ("- a\n- b\n", "holds a list; expected a ROS 2 parameter file"),
    ("qos_reliability: reliable\n", "neither format.*unknown config key.*qos_reliability.*plain mapping of pipeline keys"),
    ("tau_verify: 2.0\n", "neither format.*tau_verify"),
    ("/**:\n  ros__parameters: {qos_depth: 5}\ntau_verify: 0.8\n", "mixes ROS parameters with plain keys \\(tau_verify"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_other_files_are_refused_with_the_expected_formats(tmp_path, content, match):
    with pytest.raises(LaunchArgumentError, match=match):
        ros_params_file(_write(tmp_path, "bad.yaml", content))
    with pytest.raises(LaunchArgumentError, match="not found"):
        ros_params_file(str(tmp_path / "missing.yaml"))


def test_defaults_give_the_default_config_and_no_overrides_beyond_sim_time():
    s = node_setup({}, TRACK)
    assert s["parameters"] == [TRACK, {"use_sim_time": False}]
    assert s["remappings"] == [("image", "image")]
    assert (s["lifecycle"], s["autostart"], s["arguments"]) == (False, False, [])


def test_replay_arguments_set_the_node_parameters_with_their_types(tmp_path):
    mask = _write(tmp_path, "m.png", "x")
    s = node_setup({"use_sim_time": "true", "image_topic": "/camera/image_raw", "qos_reliability": "reliable",
                    "qos_depth": "100", "frame_queue_size": "1000", "initial_mask": mask, "device": "cpu",
                    "prompts_file": "/p.yaml"}, TRACK)
    assert s["parameters"][1] == {"use_sim_time": True, "pipeline.device": "cpu", "initial_mask": mask,
                                  "prompts_file": "/p.yaml", "qos_reliability": "reliable", "qos_depth": 100,
                                  "frame_queue_size": 1000}
    assert s["remappings"] == [("image", "/camera/image_raw")]
    with pytest.raises(LaunchArgumentError, match="qos_depth must be an integer, got 'many'"):
        node_setup({"qos_depth": "many"}, TRACK)
    with pytest.raises(LaunchArgumentError, match="unknown launch argument.*qos"):
        node_setup({"qos": "1"}, TRACK)
    with pytest.raises(LaunchArgumentError, match="expected true or false"):
        node_setup({"use_sim_time": "maybe"}, TRACK)


def test_depth_compressed_and_lifecycle(tmp_path):
    s = node_setup({"image_topic": "/cam/color/image_raw/compressed",
                    "depth_topic": "/cam/aligned_depth_to_color/image_raw", "lifecycle": "true"}, TRACK)
    assert s["parameters"][1]["input_type"] == "compressed" and s["parameters"][1]["use_depth"] is True
    assert s["remappings"] == [("image/compressed", "/cam/color/image_raw/compressed"),
                               ("depth", "/cam/aligned_depth_to_color/image_raw"),
                               ("depth/camera_info", "/cam/aligned_depth_to_color/camera_info")]
    assert (s["lifecycle"], s["autostart"], s["arguments"]) == (True, True, ["--lifecycle"])
    s = node_setup({"depth_topic": "depth_raw", "depth_camera_info_topic": "/info", "lifecycle": "true",
                    "autostart": "false"}, TRACK)
    assert s["remappings"][-1] == ("depth/camera_info", "/info") and s["autostart"] is False
    assert depth_camera_info_topic("depth") == "camera_info"
    with pytest.raises(LaunchArgumentError, match="depth_topic is empty"):
        node_setup({"depth_camera_info_topic": "/info"}, TRACK)
    plain = _write(tmp_path, "plain.yaml", {"tau_verify": 0.5})
    assert load_config(node_setup({"config": plain}, TRACK, str(tmp_path))["parameters"][0]).tau_verify == 0.5


def test_every_parameter_the_launch_file_sets_is_declared_by_the_node():
    from hqsmem_ros.ros.node import NODE_PARAMS
    s = node_setup({name: "" for name in LAUNCH_ARGUMENTS} | {
        "use_sim_time": "true", "device": "cuda", "initial_mask": "m.png", "prompts_file": "p.yaml",
        "qos_reliability": "reliable", "qos_depth": "5", "frame_queue_size": "2", "depth_topic": "/d",
        "image_topic": "/i/compressed", "lifecycle": "false", "autostart": "true", "config": TRACK}, TRACK)
    names = set(s["parameters"][1])
    pipeline_keys = {f"pipeline.{k}" for k in PipelineConfig.__dataclass_fields__}
    # the depth parameters (DEPTH_NODE_PARAMS) are among the node's own (ros/parameters.py)
    assert set(DEPTH_NODE_PARAMS) <= set(NODE_PARAMS)
    assert names - set(NODE_PARAMS) - pipeline_keys == {"use_sim_time"}
    assert {"initial_mask", "prompts_file", "qos_reliability", "qos_depth", "frame_queue_size",
            "use_depth"} <= names & set(NODE_PARAMS)


def test_hqsmem_node_refuses_a_config_of_neither_format_with_exit_2(tmp_path):
    import subprocess
    import sys
    bad = _write(tmp_path, "bad.yaml", "qos_depth: 5\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "hqsmem_ros.ros.main", "--config", bad], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert res.returncode == 2, res.stdout
    assert "neither format" in res.stdout and "ros__parameters" in res.stdout and bad in res.stdout


def test_dds_profile_argument_sets_the_node_environment(tmp_path):
    from hqsmem_ros.launch_params import LaunchArgumentError, dds_environment
    from hqsmem_ros.ros import dds_transport as dds
    shipped = tmp_path / "fastdds.xml"
    shipped.write_text("<dds/>")
    assert dds_environment("shipped", str(shipped), {}) == {dds.PROFILE_ENV: str(shipped)}
    assert dds_environment("shipped", str(shipped), {"ROS_DISTRO": "jazzy"}) == {
        dds.PROFILE_ENV: str(shipped), dds.LEGACY_PROFILE_ENV: str(shipped)}
    assert dds_environment("", str(shipped), {}) == {dds.OPT_OUT_ENV: "1"}  # Fast DDS's defaults
    assert dds_environment("shipped", str(shipped), {dds.PROFILE_ENV: "/mine.xml"}) == {}  # the user's wins
    with pytest.raises(LaunchArgumentError, match="not found"):
        dds_environment(str(tmp_path / "missing.xml"), None, {})
