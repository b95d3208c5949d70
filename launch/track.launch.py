"""Launch the HQ-SMem tracking node.

  ros2 launch hqsmem_ros track.launch.py image_topic:=/camera/color/image_raw \
      config:=$(ros2 pkg prefix hqsmem_ros)/share/hqsmem_ros/config/jetson_orin.yaml device:=cuda
  ros2 launch hqsmem_ros track.launch.py image_topic:=/camera/image_raw use_sim_time:=true \
      qos_reliability:=reliable qos_depth:=100 frame_queue_size:=1000 initial_mask:=/path/mask.png

`ros2 launch hqsmem_ros track.launch.py --show-args` lists the arguments. What each argument
sets is in hqsmem_ros/launch_params.py (tested without ROS); this file only turns it into
launch actions.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from hqsmem_ros.launch_params import LAUNCH_ARGUMENTS, LaunchArgumentError, node_setup


def _node(context, *args, **kwargs):
    values = {name: LaunchConfiguration(name).perform(context) for name in LAUNCH_ARGUMENTS}
    share = get_package_share_directory("hqsmem_ros")
    try:
        setup = node_setup(values, os.path.join(share, "config", "track.yaml"),
                           shipped_dds_profile=os.path.join(share, "config", "fastdds.xml"))
    except LaunchArgumentError as exc:
        raise RuntimeError(f"hqsmem_ros track.launch.py: {exc}") from None
    common = dict(package="hqsmem_ros", executable="hqsmem_node", name="hqsmem_node",
                  namespace=values["namespace"], parameters=setup["parameters"],
                  remappings=setup["remappings"], arguments=setup["arguments"],
                  additional_env=setup["env"], output="screen", emulate_tty=True)
    if not setup["lifecycle"]:
        return [Node(**common)]

    from launch.events import matches_action
    from launch_ros.actions import LifecycleNode
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    node = LifecycleNode(**common)
    actions = [node]
    if setup["autostart"]:
        def change(transition):
            return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                               transition_id=transition))
        # configure now; activate once configuring has reached 'inactive'.
        actions.append(RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=node, goal_state="inactive",
            entities=[change(Transition.TRANSITION_ACTIVATE)])))
        actions.append(change(Transition.TRANSITION_CONFIGURE))
    return actions


def _declare(name):
    default, description = LAUNCH_ARGUMENTS[name]
    return DeclareLaunchArgument(name, default_value=default, description=description)


def generate_launch_description():
    return LaunchDescription([
        _declare("image_topic"),
        _declare("config"),
        _declare("namespace"),
        _declare("device"),
        _declare("use_sim_time"),
        _declare("initial_mask"),
        _declare("prompts_file"),
        _declare("qos_reliability"),
        _declare("qos_depth"),
        _declare("frame_queue_size"),
        _declare("depth_topic"),
        _declare("depth_camera_info_topic"),
        _declare("lifecycle"),
        _declare("autostart"),
        _declare("dds_profile"),
        OpaqueFunction(function=_node),
    ])
