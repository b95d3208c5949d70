"""ROS-free input/output shared by every driver (the node, `hqsmem bag`, the tools):
sensor_msgs image codecs (image_codec), ObjectPrompt message checks (prompt_msgs), prompts
files (prompts_file) and overlay rendering (overlay). Imports only hqsmem_ros.core."""
