"""The ROS 2 package files: package.xml, the launch file, the parameter files (no rclpy needed)."""
import ast
import py_compile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from hqsmem_ros.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_package_xml_is_format_3_with_the_runtime_dependencies():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "hqsmem_ros"
    deps = {e.text for e in root if e.tag.endswith("depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "cv_bridge",
            "rosidl_default_generators", "rosidl_default_runtime", "python3-numpy"} <= deps
    assert root.find("export/build_type").text == "ament_cmake"
    assert "rosidl_interface_packages" in {e.text for e in root.findall("member_of_group")}


def test_package_xml_passes_catkin_pkg():
    catkin_pkg = pytest.importorskip("catkin_pkg.package", reason="catkin_pkg comes with scripts/setup_ros.sh")
    pkg = catkin_pkg.parse_package(str(ROOT / "package.xml"))
    pkg.validate()  # rejects e.g. an invalid maintainer e-mail


def test_cmakelists_generates_every_interface_file():
    text = (ROOT / "CMakeLists.txt").read_text()
    for f in sorted((ROOT / "msg").glob("*.msg")) + sorted((ROOT / "srv").glob("*.srv")):
        assert f'"{f.parent.name}/{f.name}"' in text, f
    for exe in ("hqsmem_node", "synthetic_camera", "synthetic_rgbd_camera", "hqsmem_recorder"):
        assert f"scripts/{exe}" in text and (ROOT / "scripts" / exe).stat().st_mode & 0o111


def test_launch_file_compiles_and_declares_its_arguments():
    path = ROOT / "launch" / "track.launch.py"
    py_compile.compile(str(path), doraise=True)
    tree = ast.parse(path.read_text())
    declared = [node.args[0].value for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_declare"]
    from hqsmem_ros.launch_params import LAUNCH_ARGUMENTS
    assert sorted(declared) == sorted(LAUNCH_ARGUMENTS)  # each once, and every one the helper reads
    assert {"image_topic", "config", "namespace", "device", "use_sim_time", "initial_mask", "prompts_file",
            "qos_reliability", "qos_depth", "frame_queue_size", "depth_topic", "lifecycle", "autostart", "dds_profile"} <= set(declared)
    assert "additional_env" in path.read_text() and "fastdds.xml" in path.read_text()
    assert "generate_launch_description" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    # The launch file hands every argument to node_setup and builds a LifecycleNode in lifecycle mode.
    calls = {getattr(n.func, "id", getattr(n.func, "attr", "")) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert {"node_setup", "Node", "LifecycleNode", "ChangeState", "OnStateTransition", "RegisterEventHandler"} <= calls


def test_fastdds_profile_holds_large_frames_and_is_the_default_profile():
    from hqsmem_ros.ros import dds_transport
    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(ROOT / "config" / "fastdds.xml").getroot()
    shm = [t for t in root.iterfind(".//d:transport_descriptor", ns) if t.findtext("d:type", namespaces=ns) == "SHM"]
    assert len(shm) == 1
    segment = int(shm[0].findtext("d:segment_size", namespaces=ns))
    assert segment == dds_transport.SEGMENT_BYTES >= 8 * 1280 * 720 * 3  # several 720p rgb8 frames
    participant = root.find(".//d:participant", ns)
    assert participant.get("is_default_profile") == "true"
    used = [e.text for e in participant.iterfind(".//d:userTransports/d:transport_id", ns)]
    assert shm[0].findtext("d:transport_id", namespaces=ns) in used
    assert participant.findtext(".//d:useBuiltinTransports", namespaces=ns) == "false"


def test_transport_settings_apply_unless_set_or_opted_out():
    from hqsmem_ros.ros import dds_transport as t
    env = {}
    assert "fastdds.xml" in t.apply(env) and env[t.PROFILE_ENV] == str(ROOT / "config" / "fastdds.xml")
    assert t.LEGACY_PROFILE_ENV not in env  # Fast DDS 3 warns about the old name
    env = {"ROS_DISTRO": "humble"}
    t.apply(env)
    assert env[t.LEGACY_PROFILE_ENV] == env[t.PROFILE_ENV]  # Fast DDS 2.x reads only the old name
    env = {t.PROFILE_ENV: "/mine.xml"}
    assert "/mine.xml" in t.apply(env) and env == {t.PROFILE_ENV: "/mine.xml"}
    env = {t.OPT_OUT_ENV: "1"}
    assert "default" in t.apply(env) and t.PROFILE_ENV not in env
    env = {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert "not Fast DDS" in t.apply(env) and t.PROFILE_ENV not in env
    assert t.loss_warning(100, 2) is None and t.loss_warning(10, 9) is None  # a few %, few frames
    assert "fastdds.xml" in t.loss_warning(2701, 4497) and "62 %" in t.loss_warning(2701, 4497)


@pytest.mark.parametrize("name", ["track.yaml", "cpu.yaml", "jetson_orin.yaml"])
def test_parameter_files(name):
    data = yaml.safe_load((ROOT / "config" / name).read_text())
    ((key, node),) = data.items()
    params = node["ros__parameters"]
    assert isinstance(params["pipeline"], dict)
    if name != "jetson_orin.yaml":  # the Jetson profile names GPU models built only where installed
        cfg = load_config(ROOT / "config" / name)
        assert cfg.tracker["type"] == params["pipeline"]["tracker"]["type"]
    try:
        from hqsmem_ros.ros.node import NODE_PARAMS
    except ImportError:
        pytest.skip("rclpy not installed: run scripts/setup_ros.sh")
    unknown = set(params) - set(NODE_PARAMS) - {"pipeline", "use_sim_time"}
    assert not unknown, f"{name}: keys the node does not declare: {unknown}"
