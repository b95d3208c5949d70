"""The ROS 2 side: the tracking node, a synthetic camera, a recorder (these import rclpy) and
image_codec (ROS-free sensor_msgs image conversions)."""
