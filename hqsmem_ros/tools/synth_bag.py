"""Synthetic camera bags (rosbag2, mcap or sqlite3) for tests and `hqsmem bag` benchmarks, ROS-free.

  python -m hqsmem_ros.tools.synth_bag OUT_BAG --frames 1000 --size 640x480 --format rgb8 \
      --storage mcap --prompts file

Writes the scenes of hqsmem_ros.data.synth as sensor_msgs/Image (rgb8, bgr8) or
CompressedImage (jpeg, png) on an image topic, a sensor_msgs/CameraInfo beside each image (an
extra topic that `hqsmem bag` must copy through), and the first frame's objects as prompts:
`--prompts file` writes OUT_BAG.prompts.yaml + OUT_BAG.prompt0.png (a prompts file, see
hqsmem_ros/io/prompts_file.py), `--prompts topic` records an hqsmem_ros/ObjectPromptArray on
/hqsmem_node/prompts stamped like the first image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from hqsmem_ros.io import image_codec

IMAGE_FORMATS = ("rgb8", "bgr8", "jpeg", "png")
DEFAULT_START_NS = 1_700_000_000_000_000_000


def _header(store, stamp_ns: int, frame_id: str):
    T = store.types
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec),
                                    frame_id=frame_id)


def image_message(store, rgb: np.ndarray, stamp_ns: int, image_format: str = "rgb8",
                  frame_id: str = "camera") -> Tuple[str, Any]:
    """(ROS type name, rosbags message) of an RGB frame as Image (rgb8/bgr8) or CompressedImage."""
    header = _header(store, stamp_ns, frame_id)
    if image_format in ("jpeg", "png"):
        data = image_codec.encode_compressed(rgb, image_format, quality=90)
        msg = store.types["sensor_msgs/msg/CompressedImage"](header=header, format=image_format,
                                                            data=np.frombuffer(data, np.uint8))
        return "sensor_msgs/msg/CompressedImage", msg
    if image_format not in ("rgb8", "bgr8"):
        raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    pixels = rgb if image_format == "rgb8" else np.ascontiguousarray(rgb[..., ::-1])
    f = image_codec.encode_image(pixels, image_format)
    msg = store.types["sensor_msgs/msg/Image"](
        header=header, height=f["height"], width=f["width"], encoding=f["encoding"],
        is_bigendian=int(f["is_bigendian"]), step=f["step"], data=np.frombuffer(f["data"], np.uint8))
    return "sensor_msgs/msg/Image", msg


def camera_info_message(store, stamp_ns: int, width: int, height: int, frame_id: str = "camera"):
    CameraInfo = store.types["sensor_msgs/msg/CameraInfo"]
    RegionOfInterest = store.types["sensor_msgs/msg/RegionOfInterest"]
    f = float(max(width, height))
    return CameraInfo(
        header=_header(store, stamp_ns, frame_id), height=height, width=width, distortion_model="plumb_bob",
        d=np.zeros(5), k=np.array([f, 0, width / 2, 0, f, height / 2, 0, 0, 1], float),
        r=np.eye(3).ravel(), p=np.array([f, 0, width / 2, 0, 0, f, height / 2, 0, 0, 0, 1, 0], float),
        binning_x=0, binning_y=0,
        roi=RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def prompt_array_message(store, label: np.ndarray, stamp_ns: int, frame_id: str = "camera"):
    """ObjectPromptArray with one mono16 label-mask prompt per object id in `label`."""
    T = store.types
    f = image_codec.encode_image(label.astype(np.uint16), "mono16")
    mask = T["sensor_msgs/msg/Image"](header=_header(store, stamp_ns, frame_id), height=f["height"],
                                      width=f["width"], encoding="mono16", is_bigendian=int(f["is_bigendian"]),
                                      step=f["step"], data=np.frombuffer(f["data"], np.uint8))
    prompts = [T["hqsmem_ros/msg/ObjectPrompt"](id=int(i), label=f"object{int(i)}", has_box=False, x_min=0.0,
                                                y_min=0.0, x_max=0.0, y_max=0.0, mask=mask,
                                                positive_points=[], negative_points=[])
               for i in np.unique(label) if i]
    return T["hqsmem_ros/msg/ObjectPromptArray"](header=_header(store, stamp_ns, frame_id), prompts=prompts)


def write_prompts_file(path: Union[str, Path], label: np.ndarray, frame: int = 0) -> Path:
    """A prompts file starting every object of `label` (ids = its values) on `frame`."""
    from hqsmem_ros.eval.davis_io import write_label

    path = Path(path)
    mask_path = path.with_name(path.name.replace(".prompts.yaml", "") + ".prompt0.png")
    write_label(mask_path, label)
    lines = ["# objects of the first synthetic frame (written by hqsmem_ros.tools.synth_bag)", "prompts:"]
    for i in (int(v) for v in np.unique(label) if v):
        lines += [f"  - id: {i}", f"    frame: {frame}", f"    mask: {mask_path.name}", f"    label: object{i}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_synthetic_bag(path: Union[str, Path], frames: int = 20, size: Tuple[int, int] = (160, 120),
                        storage: str = "mcap", image_format: str = "rgb8", n_objects: int = 3,
                        seed: int = 0, scenario: str = "mixed", topic: str = "/camera/image_raw",
                        fps: float = 30.0, start_ns: int = DEFAULT_START_NS, prompts: Optional[str] = "file",
                        camera_info: bool = True, log_every: int = 0) -> Dict[str, Any]:
    """Write a synthetic camera bag; returns {bag, topic, stamps_ns, prompts_file, labels0}."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from hqsmem_ros.io.bagfiles import make_typestore
    from hqsmem_ros.data.synth import iter_frames

    if prompts not in (None, "none", "file", "topic"):
        raise ValueError(f"prompts must be file, topic or none, got {prompts!r}")
    if storage not in ("mcap", "sqlite3"):
        raise ValueError(f"storage must be mcap or sqlite3, got {storage!r}")
    path = Path(path)
    store = make_typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    period = int(round(1e9 / fps))
    stamps = []
    info: Dict[str, Any] = {"bag": path, "topic": topic, "prompts_file": None}
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        msgtype = "sensor_msgs/msg/CompressedImage" if image_format in ("jpeg", "png") else "sensor_msgs/msg/Image"
        image_conn = writer.add_connection(topic, msgtype, typestore=store)
        info_conn = (writer.add_connection(topic.rsplit("/", 1)[0] + "/camera_info", "sensor_msgs/msg/CameraInfo",
                                           typestore=store) if camera_info else None)
        prompt_conn = (writer.add_connection("/hqsmem_node/prompts", "hqsmem_ros/msg/ObjectPromptArray",
                                             typestore=store) if prompts == "topic" else None)
        for t, (rgb, label) in enumerate(iter_frames(seed, size, frames, n_objects, scenario)):
            stamp = start_ns + t * period
            stamps.append(stamp)
            if t == 0:
                info["labels0"] = label
                if prompts == "file":
                    info["prompts_file"] = write_prompts_file(path.with_name(path.name + ".prompts.yaml"), label)
                elif prompt_conn is not None:
                    msg = prompt_array_message(store, label, stamp)
                    writer.write(prompt_conn, stamp, store.serialize_cdr(msg, prompt_conn.msgtype))
            if info_conn is not None:
                msg = camera_info_message(store, stamp, rgb.shape[1], rgb.shape[0])
                writer.write(info_conn, stamp, store.serialize_cdr(msg, info_conn.msgtype))
            msgtype, msg = image_message(store, rgb, stamp, image_format)
            writer.write(image_conn, stamp, store.serialize_cdr(msg, msgtype))
            if log_every and (t + 1) % log_every == 0:
                print(f"wrote {t + 1}/{frames} frames", file=sys.stderr, flush=True)
    info["stamps_ns"] = stamps
    return info


def _size(text: str) -> Tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hqsmem_ros.tools.synth_bag", description=__doc__.split("\n")[0])
    ap.add_argument("out_bag")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", type=_size, default=(640, 480))
    ap.add_argument("--format", choices=IMAGE_FORMATS, default="rgb8")
    ap.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    ap.add_argument("--objects", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenario", default="mixed")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--topic", default="/camera/image_raw")
    ap.add_argument("--prompts", choices=("file", "topic", "none"), default="file")
    args = ap.parse_args(argv)
    info = write_synthetic_bag(args.out_bag, args.frames, args.size, args.storage, args.format, args.objects,
                               args.seed, args.scenario, args.topic, args.fps, prompts=args.prompts,
                               log_every=1000)
    print(f"wrote {args.frames} frames on {args.topic} to {info['bag']}"
          + (f"; prompts file {info['prompts_file']}" if info["prompts_file"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
