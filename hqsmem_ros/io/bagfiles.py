"""rosbag2 files without a ROS install (rosbags): message types, opening, reading back.

Shared by `hqsmem bag` (hqsmem_ros/bag.py) and the tools (replay); ROS-free."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from hqsmem_ros.io import image_codec
from hqsmem_ros.io.prompts_file import format_stamp


IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
OBJECTS_TYPE = "hqsmem_ros/msg/TrackedObjectArray"
PROMPTS_TYPE = "hqsmem_ros/msg/ObjectPromptArray"
STORAGES = ("mcap", "sqlite3")
DEFAULT_NS = "/hqsmem_node"


class BagError(ValueError):
    """A bag that cannot be read or written, or a request that does not fit it; names the file."""


# ---------------------------------------------------------------------------------------------
# Message types without a ROS build


def msg_dir_candidates() -> List[Path]:
    """Where hqsmem_ros's .msg files may be, most specific first.

    Source checkout: <repo>/msg beside the package. colcon install: share/hqsmem_ros/msg under
    each AMENT_PREFIX_PATH entry (ament_index_python when importable). pip install:
    <prefix>/share/hqsmem_ros/msg (setup.py data_files).
    """
    here = Path(__file__).resolve().parent.parent  # the hqsmem_ros package
    out = [here.parent / "msg"]
    try:
        from ament_index_python.packages import get_package_share_directory
        out.append(Path(get_package_share_directory("hqsmem_ros")) / "msg")
    except Exception:  # not installed, or the package is not in the ament index
        pass
    for prefix in filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
        out.append(Path(prefix) / "share" / "hqsmem_ros" / "msg")
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        out.append(Path(prefix) / "share" / "hqsmem_ros" / "msg")
    return out


def find_msg_dir() -> Path:
    tried = msg_dir_candidates()
    for d in tried:
        if (d / "TrackedObjectArray.msg").is_file():
            return d
    raise BagError("hqsmem_ros's message definitions (TrackedObjectArray.msg, ...) were not found; looked in: "
                   + ", ".join(str(d) for d in tried))


_TYPESTORE = None


def make_typestore():
    """rosbags typestore: ROS 2 (Humble) standard types plus hqsmem_ros/msg/* from the .msg files."""
    global _TYPESTORE
    if _TYPESTORE is None:
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore
        store = get_typestore(Stores.ROS2_HUMBLE)
        types: Dict[str, Any] = {}
        for path in sorted(find_msg_dir().glob("*.msg")):
            types.update(get_types_from_msg(path.read_text(encoding="utf-8"), f"hqsmem_ros/msg/{path.stem}"))
        store.register(types)
        _TYPESTORE = store
    return _TYPESTORE


def stamp_ns_of(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


# ---------------------------------------------------------------------------------------------
# Reading


def open_bag(path: Union[str, Path]):
    """An open rosbags Reader; a missing, truncated or corrupt bag gives a BagError naming it."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise BagError(f"input bag not found: {path}")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # ReaderError, FileNotFoundError, sqlite3/mcap/yaml errors
        hint = ""
        text = str(exc)
        if "end magic" in text or "malformed" in text or "not a database" in text:
            hint = (" (the file looks truncated or corrupt, e.g. a recording that was cut off; "
                    "`ros2 bag reindex` or `mcap recover` may repair it)")
        elif "metadata" in text:
            hint = " (a bag folder needs its metadata.yaml; or give the .mcap/.db3 file itself)"
        raise BagError(f"cannot read bag {path}: {text}{hint}") from exc
    return reader


def bag_storage(path: Path) -> str:
    """'mcap' or 'sqlite3' for a bag folder or a single storage file."""
    path = Path(path)
    if path.is_file():
        return "mcap" if path.suffix == ".mcap" else "sqlite3"
    import yaml
    try:
        meta = yaml.safe_load((path / "metadata.yaml").read_text(encoding="utf-8"))
        storage = meta["rosbag2_bagfile_information"]["storage_identifier"]
    except Exception:
        storage = "mcap" if any(path.glob("*.mcap")) else "sqlite3"
    return storage if storage in STORAGES else "sqlite3"


def topic_table(reader) -> str:
    rows = [f"{c.topic} ({c.msgtype}, {c.msgcount} messages)" for c in reader.connections]
    return "; ".join(rows) if rows else "none (the bag is empty)"


# ---------------------------------------------------------------------------------------------
# Reading results back (tests, tools)


def read_outputs(bag: Union[str, Path], ns: str = DEFAULT_NS) -> Dict[str, List[Tuple[int, Any]]]:
    """{topic: [(bag time ns, deserialized message)]} of a bag's output topics (masks, objects, overlay)."""
    store = make_typestore()
    reader = open_bag(bag)
    try:
        wanted = [c for c in reader.connections if c.topic.startswith(ns.rstrip("/") + "/")]
        out: Dict[str, List[Tuple[int, Any]]] = {c.topic: [] for c in wanted}
        for conn, bag_ns, raw in (reader.messages(connections=wanted) if wanted else ()):
            out[conn.topic].append((bag_ns, store.deserialize_cdr(raw, conn.msgtype)))
    finally:
        reader.close()
    return out


def verify_outputs(out_bag: Union[str, Path], image_topic: str, ns: str = DEFAULT_NS) -> Dict[str, Any]:
    """Read an output bag back and check it against its own copy of the image topic.

    Returns counts and problems: images without exactly one masks and one objects message of the
    same bag time and header stamp, outputs without an image, frames whose mask ids differ from
    the objects marked visible. `problems` is empty when nothing was lost or mixed up.
    """
    store = make_typestore()
    reader = open_bag(out_bag)
    ns = ns.rstrip("/")
    images: List[Tuple[int, int]] = []
    masks: Dict[Tuple[int, int], List[set]] = {}
    objects: Dict[Tuple[int, int], List[set]] = {}
    try:
        for conn, bag_ns, raw in reader.messages():
            if conn.topic == image_topic:
                msg = store.deserialize_cdr(raw, conn.msgtype)
                images.append((bag_ns, stamp_ns_of(msg.header)))
            elif conn.topic == f"{ns}/masks":
                msg = store.deserialize_cdr(raw, conn.msgtype)
                ids = set(np.unique(image_codec.mask_from_msg(msg)).tolist()) - {0}
                masks.setdefault((bag_ns, stamp_ns_of(msg.header)), []).append(ids)
            elif conn.topic == f"{ns}/objects":
                msg = store.deserialize_cdr(raw, conn.msgtype)
                ids = {int(o.id) for o in msg.objects if o.visible}
                objects.setdefault((bag_ns, stamp_ns_of(msg.header)), []).append(ids)
    finally:
        reader.close()
    problems: List[str] = []
    for key in images:
        m, o = masks.get(key, []), objects.get(key, [])
        if len(m) != 1 or len(o) != 1:
            problems.append(f"image at bag time {key[0]} (stamp {format_stamp(key[1])}): {len(m)} masks and "
                            f"{len(o)} objects messages")
        elif m[0] != o[0]:
            problems.append(f"image at stamp {format_stamp(key[1])}: mask ids {sorted(m[0])} but visible "
                            f"objects {sorted(o[0])}")
    stray = (set(masks) | set(objects)) - set(images)
    problems += [f"output at bag time {k[0]} (stamp {format_stamp(k[1])}) has no image" for k in sorted(stray)]
    return {"images": len(images), "masks": sum(len(v) for v in masks.values()),
            "objects": sum(len(v) for v in objects.values()), "problems": problems}
