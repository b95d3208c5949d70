"""The Fast DDS transport settings that carry raw camera frames between processes on one host.

Fast DDS's default shared-memory segment (512 KB per participant) is smaller than one 640x480
rgb8 frame: with best-effort QoS most large frames are lost between processes (2 of 3 at
640x480 15 Hz, docs/benchmarks.md). config/fastdds.xml gives each participant a 64 MB segment.
``apply()`` points Fast DDS at it through FASTDDS_DEFAULT_PROFILES_FILE before ROS starts in
this process; the node, the synthetic camera, the recorder, the replay tool and the launch file
call it. It changes nothing when that variable is already set (your own profile wins), when
HQSMEM_DDS_DEFAULTS=1 (opt-out: Fast DDS's defaults), or when another RMW than Fast DDS is used.
No ROS import here: it must run before rclpy is imported.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import MutableMapping, Optional

PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"  # Fast DDS 3 (Kilted; 3.2.3 in the PyPI wheels)
LEGACY_PROFILE_ENV = "FASTRTPS_DEFAULT_PROFILES_FILE"  # Fast DDS 2.x (Humble, Jazzy)
FAST_DDS_2_DISTROS = ("humble", "iron", "jazzy")  # ROS_DISTRO, set by their setup.bash
OPT_OUT_ENV = "HQSMEM_DDS_DEFAULTS"
PROFILE_NAME = "fastdds.xml"
SEGMENT_BYTES = 64 * 1024 * 1024  # as config/fastdds.xml (checked by the tests)
# Transport losses above this share of the frames a publisher sent make the node warn.
LOSS_WARN_FRACTION = 0.03
LOSS_WARN_MIN_FRAMES = 20


def shipped_profile() -> Optional[Path]:
    """config/fastdds.xml of the source tree, or of the installed ROS package (share dir)."""
    here = Path(__file__).resolve().parents[2] / "config" / PROFILE_NAME
    if here.is_file():
        return here
    try:
        from ament_index_python.packages import get_package_share_directory
        shared = Path(get_package_share_directory("hqsmem_ros")) / "config" / PROFILE_NAME
        return shared if shared.is_file() else None
    except Exception:  # no ament index (pip install without ROS), or the package is not installed
        return None


def _uses_fast_dds(environ) -> bool:
    rmw = environ.get("RMW_IMPLEMENTATION", "")
    return rmw == "" or rmw.startswith("rmw_fastrtps")


def apply(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Set the shipped profile in `environ` (default os.environ) unless told not to; returns
    one line saying which transport settings this process uses."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT_ENV, "") not in ("", "0"):
        return f"Fast DDS default transports ({OPT_OUT_ENV}={env[OPT_OUT_ENV]})"
    if not _uses_fast_dds(env):
        return f"transport settings of {env['RMW_IMPLEMENTATION']} (not Fast DDS: {PROFILE_NAME} not used)"
    for name in (PROFILE_ENV, LEGACY_PROFILE_ENV):
        if env.get(name):
            return f"your Fast DDS profile {name}={env[name]}"
    profile = shipped_profile()
    if profile is None:
        return f"Fast DDS default transports ({PROFILE_NAME} not found: large raw images may be lost)"
    env[PROFILE_ENV] = str(profile)
    if env.get("ROS_DISTRO", "") in FAST_DDS_2_DISTROS:  # Fast DDS 3 warns that it is deprecated
        env[LEGACY_PROFILE_ENV] = str(profile)
    return f"Fast DDS profile {profile} (shared memory {SEGMENT_BYTES >> 20} MB; {OPT_OUT_ENV}=1 for the defaults)"


def loss_warning(received: int, lost: int) -> Optional[str]:
    """The node's diagnostics message when more than a few percent of the frames never arrived."""
    sent = received + lost
    if sent < LOSS_WARN_MIN_FRAMES or lost <= LOSS_WARN_FRACTION * sent:
        return None
    return (f"{lost} of {sent} frames ({100.0 * lost / sent:.0f} %) were lost in transport before "
            f"reaching the node: large raw images over DDS need the shipped transport settings "
            f"(config/{PROFILE_NAME} via {PROFILE_ENV}) in the camera's process too, or compressed "
            "images, or reliable QoS")


def shm_segment_sizes(pid: int) -> list:
    """Sizes (bytes) of the Fast DDS shared-memory segments process `pid` has mapped: its own
    and those of the participants it talks to (Linux /proc; [] elsewhere or when it is gone)."""
    sizes = {}
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                name = parts[-1] if len(parts) >= 6 else ""
                base = name.rsplit("/", 1)[-1]
                if not (name.startswith("/dev/shm/fastdds_") and not base.startswith("fastdds_port")
                        and not base.endswith("_el")):
                    continue
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                sizes[name] = sizes.get(name, 0) + hi - lo
    except OSError:
        return []
    return sorted(sizes.values())
