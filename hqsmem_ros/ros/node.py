"""The HQ-SMem tracking node: a thin ROS 2 adapter over hqsmem_ros.core.pipeline.HQSMemPipeline.

Topics (relative names, so a namespace and remappings apply):
  in   image (sensor_msgs/Image) or image/compressed (sensor_msgs/CompressedImage),
       camera_info (optional), ~/prompts (hqsmem_ros/ObjectPromptArray),
       depth + depth/camera_info (use_depth: aligned depth, 16UC1 mm or 32FC1 m)
  out  ~/masks (mono16 label image, pixel = object id), ~/objects (TrackedObjectArray, with 3D
       per object under use_depth), ~/overlay (rgb8, optional), ~/points (PointCloud2 of the
       objects' depth points, use_depth, only while subscribed), /diagnostics
Services: ~/add_objects, ~/remove_objects, ~/reset.

Two classes share every line of this (the _Tracking mixin): HQSMemNode, the plain node, which
configures and activates itself in its constructor, and HQSMemLifecycleNode (`hqsmem_node
--lifecycle`, hqsmem_ros.ros.lifecycle), whose transitions call the same steps: configure
(models, session, publishers), activate (subscriptions, services, diagnostics timer),
deactivate (those removed, the models kept), cleanup (the models freed).

This module owns the lifecycle steps, the image intake and one frame's path (decode -> session
step -> publish). Its mixins own the rest: parameters (parameters.py), the prompt topic and
services (requests.py), depth in and ~/points out (depth_io.py), the counters and /diagnostics
(diagnostics.py).

Threading: image callbacks start one at a time, in the order the executor took the messages
(_OrderedIntakeGroup). The callback that finds the node idle lets the next callback start, then
processes its frame itself and any frame that arrived meanwhile (no hand-over to another thread,
whose wake-up cost more than the node's own work). Callbacks arriving while a frame is
processed only leave their message in a buffer of frame_queue_size frames (1 by default, so the
node always works on the newest frame): a frame pushed out of it is counted as dropped
("replaced"), as is every frame that cannot be processed (with its reason), so frames received =
results published + frames dropped.
Frames that never reached the node (overwritten in the DDS history, lost on the network) show
as gaps in the publisher's sequence numbers and are counted as lost in transport; frames sent
before a publisher's first received one are reported as unknown (they cannot be told from
frames sent before the subscription matched), and frames lost after the last received one
cannot be seen by a subscriber at all.

What happens to a decoded frame (ids, resets, prompts, requests, accounting) is the ROS-free
hqsmem_ros.stream.StreamSession's, the same as `hqsmem bag`'s; this node decodes messages,
steps the session and publishes what it returns.
"""
from __future__ import annotations

import gc
import sys
import threading
import time
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Point, Vector3
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import (HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from hqsmem_ros.core import config_check
from hqsmem_ros.core.depth3d import Depth3D
from hqsmem_ros.core.pipeline import HQSMemPipeline
from hqsmem_ros.io import image_codec
from hqsmem_ros.io.image_codec import ImageDecodeError
from hqsmem_ros.io.outputs import array_3d_fields, stamp_parts, tracked_object_fields
from hqsmem_ros.io.overlay import render_overlay
from hqsmem_ros.msg import ObjectPromptArray, TrackedObject, TrackedObjectArray
from hqsmem_ros.ros.depth_io import DepthIO
from hqsmem_ros.ros.diagnostics import Diagnostics
from hqsmem_ros.ros.intake import OrderedIntakeGroup, takes_message_info
from hqsmem_ros.ros.parameters import (COMPONENT_KEYS, NODE_PARAMS,  # noqa: F401
                                       RUNTIME_PIPELINE_KEYS, NodeParameters)
from hqsmem_ros.ros.requests import RequestIO
from hqsmem_ros.srv import AddObjects, RemoveObjects, Reset
from hqsmem_ros.stream.accounting import SequenceGaps
from hqsmem_ros.stream.session import Request, StreamSession


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def publisher_key(info) -> Tuple[Optional[bytes], Optional[int]]:
    """(publisher gid, publication sequence number) of an rclpy MessageInfo; None where unset."""
    seq, gid = info.get("publication_sequence_number"), info.get("publisher_gid")
    if not seq or not gid:
        return None, None
    return (bytes(gid.get("data", b"")) if isinstance(gid, dict) else bytes(gid)), int(seq)


def _tracked_object(fields: Dict[str, Any]) -> TrackedObject:
    position, size = fields.pop("position", None), fields.pop("size", None)
    obj = TrackedObject(**fields)
    if position is not None:
        obj.position = Point(x=position[0], y=position[1], z=position[2])
        obj.size = Vector3(x=size[0], y=size[1], z=size[2])
    return obj


class _Tracking(RequestIO, DepthIO, Diagnostics, NodeParameters):
    """Everything of the tracking node; mixed into rclpy's Node or LifecycleNode."""

    def __init__(self, node_name: str = "hqsmem_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        # Typos are errors at start (a key nobody reads would otherwise pass silently).
        config_check.refuse_unknown_overrides(getattr(self, "_parameter_overrides", {}) or {},
                                              self._parameters, sys.argv, self.get_name())
        self.pipeline: Optional[HQSMemPipeline] = None
        self.session: Optional[StreamSession] = None
        self._final_account: Optional[Dict[str, Any]] = None  # the counts of a cleaned-up session
        self._random_weight_parts: List[str] = []
        self._last_error: Optional[str] = None
        self._last_error_time = 0.0
        self._depth_logged: Tuple[str, float] = ("", -1e9)
        self._active_entities: List[Tuple[str, Any]] = []  # what activate created: (kind, entity)
        self._output_pubs: List[Any] = []
        self.points_pub = None

        # Frames waiting while one is processed, and requests waiting for a frame; shared by the
        # callbacks and the thread that processes (guarded by _cond).
        self._cond = threading.Condition()
        self._busy = False  # a callback is processing frames (the "leader")
        # (message, perf_counter() at arrival). One slot by default (always the newest frame);
        # frame_queue_size > 1 for replays.
        self._waiting: deque = deque()
        self._queue_size = int(self.get_parameter("frame_queue_size").value)
        self._requests: deque = deque()
        self._pending_config = None
        self._reset_requested: Optional[float] = None  # the ROS time after a backward clock jump
        self._pipe_lock = threading.Lock()  # the session: one frame or ~/reset at a time
        self._stop = True  # not processing until activated
        self._stop_reason = "inactive"  # what a frame arriving while stopped is counted as
        # Benchmarks set this to a list to get one timing record per processed frame.
        self.frame_log: Optional[List[Dict[str, float]]] = None
        self._out_buffers: Dict[str, Any] = {}  # publisher -> array('B') reused for its data

        # Intake counters (received == results + dropped + pending + in progress).
        self.frames_received = 0
        self.messages_lost = 0  # the middleware's message-lost event (where it fires)
        self.sequence = SequenceGaps()
        self._camera_info: Optional[CameraInfo] = None
        self._camera_info_mismatch: Optional[Tuple[int, int, int, int]] = None
        self._diag_window_start = time.monotonic()
        self._install_clock_jump_handler()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._started = True

    # ---------------------------------------------------------------- the steps of a lifecycle
    def _configure(self) -> None:
        """Models (checkpoints loaded, device checked), the stream session, the publishers.
        Raises ConfigError / ValueError (or a model's own error) naming what is wrong."""
        self.config = self._pipeline_config_from_parameters()
        self._random_weight_parts = self._check_random_weights(self.config)
        depth = Depth3D(self._depth_params()) if self.get_parameter("use_depth").value else None
        schedule = self._load_prompts_file(self.get_parameter("prompts_file").value)
        initial = self._load_initial_mask(self.get_parameter("initial_mask").value)
        self.pipeline = HQSMemPipeline(self.config)
        self.session = StreamSession(
            self.pipeline, schedule=schedule, initial_labels=initial,
            reset_on_stamp_back=lambda: bool(self.get_parameter("reset_on_time_jump").value),
            log=self._session_log, depth=depth)
        self.masks_pub = self.create_publisher(Image, "~/masks", 10)
        self.objects_pub = self.create_publisher(TrackedObjectArray, "~/objects", 10)
        self.overlay_pub = self.create_publisher(Image, "~/overlay", 2)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._output_pubs = [self.masks_pub, self.objects_pub, self.overlay_pub, self.diag_pub]
        if depth is not None:
            self.points_pub = self.create_publisher(PointCloud2, "~/points", 5)
            self._output_pubs.append(self.points_pub)

    def _activate(self) -> None:
        with self._cond:
            self._stop = False
        self._create_subscriptions()
        self._log_start()

    def _deactivate(self, reason: str = "deactivated") -> None:
        """Stop processing (frames waiting, or arriving until the subscriptions are gone, are
        counted as dropped with `reason`), then remove the subscriptions, services and timer."""
        self.stop(reason)
        for kind, entity in reversed(self._active_entities):
            getattr(self, f"destroy_{kind}")(entity)
        self._active_entities = []
        self.sequence.pause()  # frames published while no subscription exists are not losses

    def _cleanup(self) -> None:
        """Free the models: the session and pipeline dropped, garbage collected, and CUDA's
        cached blocks given back when torch is loaded."""
        for pub in self._output_pubs:
            self.destroy_publisher(pub)
        self._output_pubs, self.points_pub = [], None
        if self.session is not None:
            self._final_account = self.session.account.snapshot()
        self.session = self.pipeline = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _create_subscriptions(self) -> None:
        """Images in their own group, so a waiting service never delays them."""
        reliability = (ReliabilityPolicy.RELIABLE if self.get_parameter("qos_reliability").value == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.get_parameter("qos_depth").value,
                         reliability=reliability, durability=qos_profile_sensor_data.durability)
        image_group = OrderedIntakeGroup()
        msg_type, topic = ((CompressedImage, "image/compressed")
                           if self.get_parameter("input_type").value == "compressed" else (Image, "image"))
        # Sequence numbers come with the message info (rclpy on Iron and later).
        on_image = self._on_image_with_info if takes_message_info() else self._on_image
        keep = self._active_entities.append
        try:  # count messages the middleware reports lost (not every RMW supports the event)
            self.image_sub = self.create_subscription(
                msg_type, topic, on_image, qos, callback_group=image_group,
                event_callbacks=self._event_callbacks())
        except Exception:
            self.image_sub = self.create_subscription(msg_type, topic, on_image, qos,
                                                      callback_group=image_group)
        keep(("subscription", self.image_sub))
        if self.get_parameter("use_camera_info").value:
            keep(("subscription", self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, qos,
                                                           callback_group=image_group)))
        if self.session.depth is not None:
            # Their own group: a frame waiting for its depth (depth_wait) must not block them.
            depth_group = MutuallyExclusiveCallbackGroup()
            keep(("subscription", self.create_subscription(Image, "depth", self._on_depth, qos,
                                                           callback_group=depth_group)))
            keep(("subscription", self.create_subscription(CameraInfo, "depth/camera_info",
                                                           self._on_depth_camera_info, qos,
                                                           callback_group=depth_group)))
        service_group = ReentrantCallbackGroup()
        keep(("subscription", self.create_subscription(ObjectPromptArray, "~/prompts", self._on_prompts, 10,
                                                       callback_group=service_group)))
        keep(("service", self.create_service(AddObjects, "~/add_objects", self._on_add_objects,
                                             callback_group=service_group)))
        keep(("service", self.create_service(RemoveObjects, "~/remove_objects", self._on_remove_objects,
                                             callback_group=service_group)))
        keep(("service", self.create_service(Reset, "~/reset", self._on_reset, callback_group=service_group)))
        keep(("timer", self.create_timer(self.get_parameter("diagnostics_period").value,
                                         self._publish_diagnostics, callback_group=service_group)))
        # Wakes the executor when the image callbacks may start again before one returned.
        self._intake_wake = self.create_guard_condition(lambda: None, callback_group=service_group)
        keep(("guard_condition", self._intake_wake))

    def _log_start(self) -> None:
        stats = self.pipeline.stats()
        input_type = self.get_parameter('input_type').value
        self.get_logger().info(
            f"tracking {self.image_sub.topic_name} ({input_type}"
            + (f", JPEG decoding: {image_codec.jpeg_decoder()}" if input_type == "compressed" else "")
            + f", {self.get_parameter('qos_reliability').value}) with tracker={stats['tracker']} "
            f"refiner={stats['refiner']} features={stats['features']} ablation={stats['ablation']} "
            f"device={self._device()}"
            + (f"; 3D from {self.resolve_topic_name('depth')} (+ depth/camera_info)"
               if self.session.depth is not None else ""))
        if self._random_weight_parts:
            self.get_logger().warning(
                f"RANDOM WEIGHTS in {', '.join(self._random_weight_parts)} (allow_random_weights is "
                "true): the models are untrained and the masks and objects this node publishes are "
                "MEANINGLESS; use this only to measure speed")

    def _session_log(self, level: str, text: str) -> None:
        if level == "error":
            self._note_error(text)
        elif level == "warning":
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)

    # ---------------------------------------------------------------- callbacks
    def _event_callbacks(self):
        try:
            from rclpy.event_handler import SubscriptionEventCallbacks
        except ImportError:  # Humble
            from rclpy.qos_event import SubscriptionEventCallbacks

        def on_lost(event):
            self.messages_lost = int(event.total_count)
        try:
            return SubscriptionEventCallbacks(message_lost=on_lost)
        except TypeError:
            return None

    def _on_image_with_info(self, msg, info) -> None:
        self.sequence.see(*publisher_key(info))
        self._on_image(msg)

    def _on_image(self, msg) -> None:
        arrived = time.perf_counter()
        with self._cond:
            self.frames_received += 1
            if self._stop:
                session = self.session
                if session is not None:
                    session.account.drop(self._stop_reason)
                elif self._final_account is not None:  # cleaned up: counted with the last session's
                    dropped = self._final_account["dropped"]
                    dropped[self._stop_reason] = dropped.get(self._stop_reason, 0) + 1
                return
            if self._busy:  # another callback is processing: leave only the newest frame(s)
                if len(self._waiting) >= self._queue_size:
                    self._waiting.popleft()
                    self.session.account.drop("replaced")
                self._waiting.append((msg, arrived))
                return
            self._busy = True
        self._release_intake()  # later frames may arrive (in order) while this one is processed
        self._lead(msg, arrived)

    def _release_intake(self) -> None:
        group = self.image_sub.callback_group
        if isinstance(group, OrderedIntakeGroup) and group.release():
            try:
                self._intake_wake.trigger()  # the executor re-checks which callbacks may start
            except Exception:  # the node is being destroyed: nothing is waiting for frames
                pass

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    # ---------------------------------------------------------------- processing
    def _lead(self, msg, arrived: float) -> None:
        """Process `msg`, then every frame left in the buffer meanwhile; only one caller at a
        time (the one that set _busy)."""
        while True:
            with self._cond:
                req = self._requests.popleft() if self._requests else None
                if req is not None:
                    req.taken = True
                cfg, self._pending_config = self._pending_config, None
                jump, self._reset_requested = self._reset_requested, None
            try:
                with self._pipe_lock:
                    if cfg is not None:
                        self._apply_config(cfg)
                    if jump is not None:
                        self._reset_after_clock_jump(jump)
                    self._process(msg, req, arrived)
            except Exception as exc:  # never let a frame take the node down: report and go on
                self.session.drop("internal_error", f"unexpected {type(exc).__name__}: {exc}")
                if req is not None and not req.done.is_set():
                    self.session.refuse(req, f"internal error: {exc}")
            with self._cond:
                if not self._waiting or self._stop:
                    self._busy = False
                    self._cond.notify_all()
                    return
                msg, arrived = self._waiting.popleft()

    def _process(self, msg, req: Optional[Request], arrived: float) -> None:
        """Decode -> session step -> publish, timed."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            max_pixels = self.get_parameter("max_image_pixels").value
            rgb = (image_codec.compressed_to_rgb(msg, max_pixels) if isinstance(msg, CompressedImage)
                   else image_codec.image_to_rgb(msg, max_pixels))
        except ImageDecodeError as exc:
            self.session.drop("bad_image", str(exc), msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)
            if req is not None:
                self._requeue(req)
            return
        t_decode = time.perf_counter() - t0
        self._check_camera_info(rgb.shape[:2])
        step = self.session.step(rgb, stamp_ns(msg.header.stamp), req)
        if step.result is None:
            if step.request_back:
                self._requeue(req)
            return
        t1 = time.perf_counter()
        frame3d = None
        if self.session.depth is not None:
            frame3d = self.session.measure_3d(step.result, want_points=self._points_wanted())
            if frame3d.reason:
                self._depth_problem(f"no 3D for this frame ({frame3d.reason}): {frame3d.error}")
        t3d = time.perf_counter()
        self._publish(msg.header, rgb, step, frame3d)
        t_end, cpu_end = time.perf_counter(), time.thread_time()
        t_publish = t_end - t3d
        # Node overhead: from the image callback to the last publish, the pipeline excluded.
        overhead = (t_end - arrived) - step.pipeline_s
        self.session.times.add({**step.result.timings, "wait": t0 - arrived, "decode": t_decode,
                                "publish": t_publish, "node_total": t_end - t0, "node_overhead": overhead,
                                **({"depth3d": t3d - t1} if frame3d is not None else {})})
        if self.frame_log is not None:
            # overhead_cpu: CPU time of this thread, the pipeline excluded (same work, no waits)
            self.frame_log.append({"stamp": step.stamp, "wait": t0 - arrived, "decode": t_decode,
                                   "pipeline": step.pipeline_s,
                                   "pipeline_total": step.result.timings.get("total", 0.0),
                                   "publish": t_publish, "overhead": overhead,
                                   "depth3d": (t3d - t1) if frame3d is not None else 0.0,
                                   "points": len(frame3d.points[0]) if frame3d is not None and frame3d.points else 0,
                                   "overhead_cpu": (cpu_end - cpu0) - step.pipeline_cpu_s})

    def _check_camera_info(self, shape) -> None:
        """A camera_info of another size means a wrong remapping: say so (once per size pair)."""
        info = self._camera_info
        if info is None or not info.width or (info.height, info.width) == tuple(shape):
            self._camera_info_mismatch = None
            return
        key = (info.width, info.height, shape[1], shape[0])
        message = (f"camera_info is {info.width}x{info.height} but the image is {shape[1]}x{shape[0]} "
                   "(wrong camera_info topic?); frames are still processed")
        if key != self._camera_info_mismatch:
            self._camera_info_mismatch = key
            self._note_error(message)
        else:  # keep /diagnostics at WARN while it lasts, without a log line per frame
            self._last_error, self._last_error_time = message, time.monotonic()

    def _install_clock_jump_handler(self) -> None:
        """With use_sim_time, a bag that loops makes /clock jump back: reset before the next frame."""
        try:
            from rclpy.clock import JumpThreshold
            from rclpy.duration import Duration
            threshold = JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1),
                                      on_clock_change=False)
            self._jump_handle = self.get_clock().create_jump_callback(threshold, post_callback=self._on_jump)
        except Exception as exc:  # not expected on Humble..Kilted: say so, stamps still reset
            self.get_logger().warning(f"no clock jump callback ({exc}); a clock going back is noticed "
                                      "only by image stamps going back")

    def _on_jump(self, jump) -> None:
        if not self.get_parameter("reset_on_time_jump").value:
            return
        clock_now = self.get_clock().now().nanoseconds * 1e-9
        with self._cond:
            self._reset_requested = clock_now

    def _reset_after_clock_jump(self, clock_now: float) -> None:
        """Before the next frame (caller holds _pipe_lock): reset unless already done.

        A looping bag sends both an older /clock and older image stamps, in either order. When
        a frame with an older stamp came first, that frame reset the tracker and the frames
        since are not newer than the clock: resetting again would drop what they started.
        """
        last = self.session.last_stamp
        if last is not None and last > clock_now:
            self.session.reset(f"the ROS clock jumped back to {clock_now:.6f}, before the last "
                               f"frame's stamp {last:.6f} (looping bag with use_sim_time?)")
        else:
            self.get_logger().info(f"the ROS clock jumped back to {clock_now:.6f}; the tracker "
                                   "holds no frame stamped after it, so no reset is needed")

    # ---------------------------------------------------------------- output
    def _publish(self, header, rgb: np.ndarray, step, frame3d=None) -> None:
        result = step.result
        label = result.label_map()
        # Label images cost a megabyte-sized conversion each: only while someone subscribes.
        # The data buffers are reused frame after frame (publish() has copied them by then).
        if self.masks_pub.get_subscription_count() > 0:
            masks = image_codec.fill_image_msg_from_pixels(Image(), label, "mono16", self._out_buffers.get("masks"))
            self._out_buffers["masks"] = masks.data
            masks.header = header
            self.masks_pub.publish(masks)
        arr = TrackedObjectArray()
        arr.header = header
        arr.frame_index = step.frame_index
        arr.height, arr.width = int(label.shape[0]), int(label.shape[1])
        arr.objects = [_tracked_object(fields) for fields in tracked_object_fields(result, step.labels, frame3d)]
        if frame3d is not None:
            f = array_3d_fields(frame3d)
            arr.frame_id_3d, arr.status_3d = f["frame_id_3d"], f["status_3d"]
            arr.depth_stamp.sec, arr.depth_stamp.nanosec = stamp_parts(f["depth_stamp"])
        self.objects_pub.publish(arr)
        self._publish_points(header, frame3d)
        if self.get_parameter("publish_overlay").value and self.overlay_pub.get_subscription_count() > 0:
            over = render_overlay(rgb, label, result.objects, self.get_parameter("overlay_alpha").value,
                                  step.labels)
            msg = image_codec.fill_image_msg_from_pixels(Image(), over, "rgb8", self._out_buffers.get("overlay"))
            self._out_buffers["overlay"] = msg.data
            msg.header = header
            self.overlay_pub.publish(msg)

    # ---------------------------------------------------------------- shutdown
    def stop(self, reason: str = "shutdown") -> None:
        """Stop processing (waiting for a frame in progress); a frame still waiting in the
        buffer, and any arriving later, is counted as dropped (`reason`)."""
        if not getattr(self, "_started", False):  # the constructor failed before the end
            return
        with self._cond:
            self._stop, self._stop_reason = True, reason
            self._cond.wait_for(lambda: not self._busy, timeout=30)
            if self.session is None:  # cleaned up: nothing waits (deactivate came first)
                return
            if self._waiting:
                self.session.account.drop(reason, len(self._waiting))
                self._waiting.clear()
            for req in self._requests:
                self.session.refuse(req, f"node {'shutting down' if reason == 'shutdown' else reason}")
            self._requests.clear()

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()


class HQSMemNode(_Tracking, Node):
    """The plain node (the default): configured and active from its constructor on."""

    def __init__(self, node_name: str = "hqsmem_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self._configure()
        self._activate()

