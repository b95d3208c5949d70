"""Launch the HQ-SMem tracking node.

  ros2 launch hqsmem_ros track.launch.py image_topic:=/camera/color/image_raw \
      config:=$(ros2 pkg prefix hqsmem_ros)/share/hqsmem_ros/config/jetson_orin.yaml device:=cuda
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _node(context, *args, **kwargs):
    image_topic = LaunchConfiguration("image_topic").perform(context)
    config = LaunchConfiguration("config").perform(context)
    device = LaunchConfiguration("device").perform(context)
    use_sim_time = LaunchConfiguration("use_sim_time").perform(context).lower() in ("true", "1", "yes")
    overrides = {"use_sim_time": use_sim_time}
    if device:  # empty: keep the config file's device
        overrides["pipeline.device"] = device
    compressed = image_topic.rstrip("/").endswith("/compressed")
    if compressed:
        overrides["input_type"] = "compressed"
    # Fast DDS transport settings for large raw images (config/fastdds.xml): the launch argument
    # dds_profile, or nothing when it is empty or FASTDDS_DEFAULT_PROFILES_FILE is already set.
    dds_profile = LaunchConfiguration("dds_profile").perform(context)
    env = {}
    if dds_profile and not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = dds_profile
        if os.environ.get("ROS_DISTRO", "") in ("humble", "iron", "jazzy"):  # Fast DDS 2.x
            env["FASTRTPS_DEFAULT_PROFILES_FILE"] = dds_profile
    elif not dds_profile:
        env["HQSMEM_DDS_DEFAULTS"] = "1"  # the node must not apply it either
    return [Node(
        package="hqsmem_ros",
        executable="hqsmem_node",
        name="hqsmem_node",
        namespace=LaunchConfiguration("namespace").perform(context),
        parameters=[config, overrides],
        remappings=[("image/compressed" if compressed else "image", image_topic)],
        output="screen",
        emulate_tty=True,
        additional_env=env,
    )]


def generate_launch_description():
    default_config = os.path.join(get_package_share_directory("hqsmem_ros"), "config", "track.yaml")
    default_profile = os.path.join(get_package_share_directory("hqsmem_ros"), "config", "fastdds.xml")
    return LaunchDescription([
        DeclareLaunchArgument("image_topic", default_value="image",
                              description="camera image topic (sensor_msgs/Image); a topic ending "
                                          "in /compressed subscribes sensor_msgs/CompressedImage"),
        DeclareLaunchArgument("config", default_value=default_config,
                              description="parameter file (see config/track.yaml)"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace of the node and its topics"),
        DeclareLaunchArgument("device", default_value="",
                              description="override pipeline.device: cpu, cuda, cuda:N (empty: from config)"),
        DeclareLaunchArgument("dds_profile", default_value=default_profile,
                              description="Fast DDS XML profile for large raw images between "
                                          "processes (empty: Fast DDS defaults); the camera "
                                          "driver's process needs it too"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (bag replay with --clock)"),
        OpaqueFunction(function=_node),
    ])
