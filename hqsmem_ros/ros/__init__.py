"""The ROS 2 side: the tracking node and its helpers (these import rclpy). The ROS-free message
codecs are in hqsmem_ros.io; the camera, recorder, replay and benchmarks in hqsmem_ros.tools."""
