"""One camera stream around the pipeline, the same for the node and `hqsmem bag` (ROS-free)."""
from .accounting import FrameAccount, SequenceGaps, StageTimes  # noqa: F401
from .session import Request, Step, StreamSession  # noqa: F401
