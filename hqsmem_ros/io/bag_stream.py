"""`hqsmem bag`'s I/O: reading and decoding images ahead of the pipeline, encoding results
into the node's messages and writing the output bag (in the calling thread or a thread of
its own). ROS-free (rosbags)."""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from hqsmem_ros.io import image_codec
from hqsmem_ros.io.bagfiles import BagError, IMAGE_TYPE, OBJECTS_TYPE
from hqsmem_ros.io.image_codec import ImageDecodeError
from hqsmem_ros.io.outputs import array_3d_fields, stamp_parts, tracked_object_fields

CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"


# ---------------------------------------------------------------------------------------------
# Output messages


class _Outputs:
    """Builds and writes the node's output messages for one result."""

    def __init__(self, writer, store, ns: str, overlay: bool, overlay_alpha: float):
        self.writer, self.store = writer, store
        self.overlay, self.alpha = overlay, overlay_alpha
        T = store.types
        self.Image, self.TrackedObject = T[IMAGE_TYPE], T["hqsmem_ros/msg/TrackedObject"]
        self.TrackedObjectArray = T[OBJECTS_TYPE]
        self.Point, self.Vector3 = T["geometry_msgs/msg/Point"], T["geometry_msgs/msg/Vector3"]
        self.Time = T["builtin_interfaces/msg/Time"]
        self.topics = {"masks": f"{ns}/masks", "objects": f"{ns}/objects"}
        if overlay:
            self.topics["overlay"] = f"{ns}/overlay"
        types = {"masks": IMAGE_TYPE, "objects": OBJECTS_TYPE, "overlay": IMAGE_TYPE}
        self.conns = {k: writer.add_connection(t, types[k], typestore=store) for k, t in self.topics.items()}

    def _image(self, header, fields) -> Any:
        return self.Image(header=header, height=fields["height"], width=fields["width"],
                          encoding=fields["encoding"], is_bigendian=int(fields["is_bigendian"]),
                          step=fields["step"], data=np.frombuffer(fields["data"], np.uint8))

    def _object(self, fields: Dict[str, Any]) -> Any:
        """A rosbags TrackedObject (every field must be given: the 3D ones default as in rclpy)."""
        position, size = fields.pop("position", (0.0, 0.0, 0.0)), fields.pop("size", (0.0, 0.0, 0.0))
        fields.setdefault("has_position_3d", False)
        fields.setdefault("valid_depth_points", 0)
        fields.setdefault("inlier_depth_points", 0)
        fields.setdefault("position_3d_status", "")
        return self.TrackedObject(position=self.Point(x=position[0], y=position[1], z=position[2]),
                                  size=self.Vector3(x=size[0], y=size[1], z=size[2]), **fields)

    def encode(self, header, rgb, result, frame_index: int, labels: Dict[int, str],
               frame3d=None) -> List[Tuple[str, bytes]]:
        label = result.label_map()
        masks = self._image(header, image_codec.label_map_to_fields(label))
        objects = [self._object(fields) for fields in tracked_object_fields(result, labels, frame3d)]
        f3 = array_3d_fields(frame3d)
        sec, nsec = stamp_parts(f3["depth_stamp"])
        arr = self.TrackedObjectArray(header=header, frame_index=int(frame_index), width=int(label.shape[1]),
                                      height=int(label.shape[0]), objects=objects, frame_id_3d=f3["frame_id_3d"],
                                      depth_stamp=self.Time(sec=sec, nanosec=nsec), status_3d=f3["status_3d"])
        out = [("masks", self.store.serialize_cdr(masks, IMAGE_TYPE)),
               ("objects", self.store.serialize_cdr(arr, OBJECTS_TYPE))]
        if self.overlay:
            from hqsmem_ros.io.overlay import render_overlay
            over = render_overlay(rgb, label, result.objects, self.alpha, labels)
            out.append(("overlay", self.store.serialize_cdr(self._image(header, image_codec.rgb_to_fields(over)),
                                                            IMAGE_TYPE)))
        return out


# ---------------------------------------------------------------------------------------------
# The run


SQLITE_CACHE_KIB = 64 * 1024
SQLITE_PAGE_BYTES = 65536  # sqlite's largest page size


def _speed_up_sqlite(writer) -> None:
    """sqlite3 output: 64 KiB pages (a 300 KB mask message fills 5 pages instead of 75 4-KiB
    overflow pages, each a separate write), no rollback journal or fsyncs (the bag is written in
    a staging folder and moved into place only when complete, so a crash leaves nothing
    half-written to recover) and a 64 MB page cache. Blob writes per 640x480 frame: 1.6-1.8 ms
    with sqlite's defaults, 1.2 with the journal and cache settings, 0.65 with the page size too
    (docs/benchmarks.md). Any sqlite reader (rosbag2 included) reads any page size."""
    conn = getattr(getattr(writer, "storage", None), "conn", None)
    if conn is None or not hasattr(conn, "execute"):  # mcap, or a rosbags without this layout
        return
    if not getattr(conn, "in_transaction", True):
        # The page size of an existing database changes only by rebuilding it: instant while
        # it holds nothing but the empty tables the writer has just created.
        conn.execute(f"PRAGMA page_size={SQLITE_PAGE_BYTES}")
        conn.execute("VACUUM")
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")


def _copy_connection(writer, conn, store):
    """An output connection for an input topic, with the input's definition and QoS."""
    ext = conn.ext
    qos = list(getattr(ext, "offered_qos_profiles", []) or [])
    fmt = getattr(ext, "serialization_format", "cdr")
    msgdef = conn.msgdef.data if conn.msgdef is not None else ""
    if msgdef and conn.digest and conn.digest.startswith("RIHS01_"):
        return writer.add_connection(conn.topic, conn.msgtype, msgdef=msgdef, rihs01=conn.digest,
                                     serialization_format=fmt, offered_qos_profiles=qos)
    if conn.msgtype in store.types:
        return writer.add_connection(conn.topic, conn.msgtype, typestore=store, serialization_format=fmt,
                                     offered_qos_profiles=qos)
    if msgdef:  # an older bag without type hashes: describe the type from its recorded definition
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore
        own = get_typestore(Stores.EMPTY)
        own.register(get_types_from_msg(msgdef, conn.msgtype))
        return writer.add_connection(conn.topic, conn.msgtype, typestore=own, serialization_format=fmt,
                                     offered_qos_profiles=qos)
    raise BagError(f"topic {conn.topic}: type {conn.msgtype} has no recorded definition and is not a "
                   "standard type, so it cannot be copied; leave it out with --exclude-topic")


class DepthFeed:
    """The recorded depth images and their camera_info, handed to a Depth3D in recorded order up
    to each colour frame's stamp + the pairing tolerance (what had arrived at a live node by
    then, with depth_wait 0). Reads through a reader of its own, so the main pass is unchanged.

    Bad depth messages are counted by Depth3D (bad_depth, bad_camera_info) and their messages
    kept in `problems` (the first few) for the summary.
    """

    def __init__(self, reader, store, depth_conns, info_conns, depth3d, bag_path: str):
        self.reader, self.store, self.depth3d, self.bag_path = reader, store, depth3d, bag_path
        self.info_ids = {c.id for c in info_conns}
        self._messages = reader.messages(connections=list(depth_conns) + list(info_conns))
        self._next = None  # (stamp seconds, connection, raw) read ahead
        self.problems: List[str] = []
        self.undecodable = 0

    def _read_ahead(self) -> bool:
        while self._next is None:
            item = next(self._messages, None)
            if item is None:
                return False
            conn, bag_ns, raw = item
            try:
                msg = self.store.deserialize_cdr(raw, conn.msgtype)
            except Exception as exc:
                self.undecodable += 1
                self._problem(f"{conn.topic} message at bag time {bag_ns} cannot be deserialized: {exc}")
                continue
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            self._next = (stamp, conn, msg)
        return True

    def _problem(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)

    def feed_until(self, stamp: float) -> None:
        """Every depth / camera_info message stamped up to `stamp` + tolerance into Depth3D."""
        from hqsmem_ros.core.depth3d import DepthError

        limit = stamp + self.depth3d.params.tolerance_s
        while self._read_ahead() and self._next[0] <= limit + 1e-9:
            t, conn, msg = self._next
            self._next = None
            try:
                if conn.id in self.info_ids:
                    self.depth3d.set_camera_info(list(msg.k), msg.width, msg.height)
                else:
                    self.depth3d.add_depth(msg.encoding, msg.height, msg.width, msg.step, bool(msg.is_bigendian),
                                           msg.data, t, msg.header.frame_id)
            except DepthError as exc:
                self._problem(f"{conn.topic} at stamp {t:.6f}: {exc}")

    def close(self) -> None:
        self.reader.close()


class _Stop(Exception):
    """The main loop ended early: the I/O threads stop."""


_END = object()


class _InputThread(threading.Thread):
    """Reads the bag, deserializes and decodes images ahead of the pipeline (bounded queue).

    Items: ("copy", conn, bag_ns, raw) for every message, then for images
    ("image", conn, bag_ns, msg or None, rgb or None, error or None). Decoding here, in input
    order, keeps the output identical to a single-threaded run.
    """

    def __init__(self, reader, store, image_ids, compressed: bool, bag_path: str, depth: int = 8,
                 max_pixels: Optional[int] = None):
        super().__init__(name="hqsmem_bag_input", daemon=True)
        self.reader, self.store, self.image_ids, self.compressed = reader, store, image_ids, compressed
        self.max_pixels = max_pixels
        self.bag_path = bag_path
        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.spent = Counter()

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop()

    def produce(self):
        """The items, read and decoded in this thread (the thread's loop, or a synchronous run)."""
        return self._read_items(decode=True)

    def _read_items(self, decode: bool = False):
        """("copy", ...) for every message and, after each image's copy, its "image" item: with
        pixels (decode=True) or with only the deserialized message (decode=False)."""
        clock, cpu = time.perf_counter, time.thread_time
        n_read = 0
        messages = self.reader.messages()
        while True:
            t0, c0 = clock(), cpu()
            try:
                item = next(messages, None)
            except Exception as exc:  # a corrupt chunk/page in the middle of the file
                raise BagError(f"cannot read bag {self.bag_path} after {n_read} messages (truncated or "
                               f"corrupt?): {type(exc).__name__}: {exc}") from exc
            self.spent["read"] += clock() - t0
            if item is None:
                self.spent["cpu_input"] += cpu() - c0
                return
            n_read += 1
            conn, bag_ns, raw = item
            image = None
            if conn.id in self.image_ids:
                image = self._decode(conn, bag_ns, raw) if decode else self._deserialize(conn, bag_ns, raw)
            self.spent["cpu_input"] += cpu() - c0
            yield ("copy", conn, bag_ns, raw)
            if image is not None:
                yield image

    def run(self) -> None:
        try:
            for item in self.produce():
                self._put(item)
            self._put(_END)
        except _Stop:
            return
        except BaseException as exc:  # handed to the main thread, which raises it
            try:
                self._put(("error", exc))
            except _Stop:
                pass

    def _decode(self, conn, bag_ns, raw):
        """An image message -> its "image" item, pixels decoded now."""
        item = self._deserialize(conn, bag_ns, raw)
        if item[3] is None:
            return item
        t0 = time.perf_counter()
        rgb, error = self._pixels(item[3])
        self.spent["decode"] += time.perf_counter() - t0
        return item[:4] + (rgb, error)

    def _deserialize(self, conn, bag_ns, raw):
        """("image", conn, bag_ns, msg, None, None), or the item of an undecodable message."""
        t0 = time.perf_counter()
        try:
            msg = self.store.deserialize_cdr(raw, conn.msgtype)
            return ("image", conn, bag_ns, msg, None, None)
        except Exception as exc:
            return ("image", conn, bag_ns, None, None,
                    ("bad_message", f"cannot deserialize {conn.msgtype}: {type(exc).__name__}: {exc}"))
        finally:
            self.spent["decode"] += time.perf_counter() - t0

    def _pixels(self, msg):
        """(rgb, None) or (None, ("bad_image", reason))."""
        try:
            rgb = (image_codec.compressed_to_rgb(msg, self.max_pixels) if self.compressed
                   else image_codec.image_to_rgb(msg, self.max_pixels))
            return rgb, None
        except ImageDecodeError as exc:
            return None, ("bad_image", str(exc))

    def produce_decoding_ahead(self):
        """produce()'s items in the same order, with each image's pixels decoded in a worker thread
        while the consumer still works on the previous image: the items up to an image are handed
        out only once the next image's decoding has started. One frame ahead, so memory stays
        bounded; decoding releases the GIL, so it overlaps the pipeline even on two cores."""
        from concurrent.futures import ThreadPoolExecutor

        def pixels_timed(msg):  # runs in the worker: its wall and CPU time are the decoding's cost
            t0, c0 = time.perf_counter(), time.thread_time()
            out = self._pixels(msg)
            self.spent["decode_worker"] += time.perf_counter() - t0  # keys only the worker writes
            self.spent["cpu_decode_worker"] += time.thread_time() - c0
            return out

        def ready(item):  # the main thread's wait for it counts as waiting for input (_run)
            if item[0] != "image" or not hasattr(item[4], "result"):
                return item
            return item[:4] + item[4].result()

        held: List[tuple] = []  # items since the last hand-out: at most one image, being decoded
        held_image = False
        with ThreadPoolExecutor(1, thread_name_prefix="hqsmem_bag_decode") as worker:
            for item in self._read_items():
                is_image = item[0] == "image"
                if is_image and item[3] is not None:
                    item = item[:4] + (worker.submit(pixels_timed, item[3]), None)
                if is_image and held_image:  # the next image is on its way: hand out the last one
                    for h in held:
                        yield ready(h)
                    held = []
                held.append(item)
                held_image = held_image or is_image
            for h in held:
                yield ready(h)
        self.spent["decode"] += self.spent.pop("decode_worker", 0.0)
        self.spent["cpu_input"] += self.spent.pop("cpu_decode_worker", 0.0)


class _Sink:
    """Opens the output bag, encodes results into the node's messages and writes everything in
    submission order; then closes the bag. Runs in the calling thread (io_threads=False);
    _SinkThread runs the same in its own thread. The bag writer is used by one thread only
    (sqlite3 connections must stay in the thread that made them)."""

    def __init__(self, open_writer, in_connections, excluded, store, ns, overlay, overlay_alpha, out_path):
        self.open_writer, self.in_connections, self.excluded = open_writer, in_connections, excluded
        self.store, self.ns, self.overlay, self.overlay_alpha = store, ns, overlay, overlay_alpha
        self.out_path = out_path
        self.writer = None
        self.copies: Dict[int, Any] = {}
        self.outputs: Optional[_Outputs] = None
        self.error: Optional[BaseException] = None
        self.spent = Counter()
        self.written = Counter()
        self.closed = False

    # -- the work ---------------------------------------------------------------------------
    def open(self) -> None:
        self.writer = self.open_writer()
        self.copies = {c.id: _copy_connection(self.writer, c, self.store) for c in self.in_connections
                       if c.topic not in self.excluded}
        self.outputs = _Outputs(self.writer, self.store, self.ns, self.overlay, self.overlay_alpha)

    def handle(self, item) -> None:
        c0 = time.thread_time()
        try:
            self._handle(item)
        finally:
            self.spent["cpu_output"] += time.thread_time() - c0

    def _handle(self, item) -> None:
        from rosbags.rosbag2 import WriterError

        clock = time.perf_counter
        if item[0] == "copy":  # ("copy", input connection, bag_ns, raw)
            out = self.copies.get(item[1].id)
            writes = [(out, item[2], item[3])] if out is not None else []
        else:  # ("result", header, rgb, result, frame_index, labels, bag_ns, frame3d or None)
            _, header, rgb, result, frame_index, labels, bag_ns, frame3d = item
            t0 = clock()
            encoded = self.outputs.encode(header, rgb, result, frame_index, labels, frame3d)
            self.spent["encode"] += clock() - t0
            writes = [(self.outputs.conns[key], bag_ns, data) for key, data in encoded]
        for conn, bag_ns, data in writes:
            t0 = clock()
            try:
                self.writer.write(conn, bag_ns, data)
            except (OSError, WriterError) as exc:
                raise BagError(f"cannot write output bag {self.out_path}: {exc}") from exc
            self.spent["write"] += clock() - t0
            self.written[conn.topic] += 1

    def close(self) -> None:
        from rosbags.rosbag2 import WriterError

        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self.writer.close()
        except (OSError, WriterError) as exc:
            raise BagError(f"cannot finish output bag {self.out_path}: {exc}") from exc
        self.spent["write"] += time.perf_counter() - t0
        self.spent["cpu_output"] += time.thread_time() - c0
        self.closed = True

    def discard(self) -> None:
        """After a failure: release the files (the caller removes the partial bag)."""
        if self.writer is not None and not self.closed:
            try:
                self.writer.close()
            except Exception:
                pass
            self.closed = True

    def output_topics(self) -> List[str]:
        return [c.topic for c in self.outputs.conns.values()] if self.outputs is not None else []

    # -- driving it -------------------------------------------------------------------------
    def start(self) -> None:
        self.open()

    def put(self, item) -> None:
        self.handle(item)

    def finish(self) -> None:
        self.close()

    def stop(self) -> None:
        self.discard()


class _SinkThread(_Sink):
    """_Sink in its own thread, fed through a bounded queue."""

    def __init__(self, *args, depth: int = 8):
        super().__init__(*args)
        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.abort = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="hqsmem_bag_output", daemon=True)

    def _loop(self) -> None:
        try:
            self.open()
            while not self.abort.is_set():
                try:
                    item = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    self.close()
                    return
                self.handle(item)
        except BaseException as exc:  # the main thread raises it on its next put / at the end
            self.error = exc
        self.discard()

    def start(self) -> None:
        self.thread.start()

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if not self.thread.is_alive():
                raise BagError(f"the writer of {self.out_path} stopped")
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if not self.closed:
            raise BagError(f"the writer of {self.out_path} stopped before closing the bag")

    def stop(self) -> None:
        self.abort.set()
        self.thread.join(timeout=30)


class _Discard(_Sink):
    """--bench's first pass: no output bag; results are dropped on the floor."""

    def __init__(self):
        super().__init__(None, (), (), None, "", False, 0.0, "")

    def start(self) -> None:
        pass

    def put(self, item) -> None:
        pass

    def finish(self) -> None:
        pass

    def stop(self) -> None:
        pass
