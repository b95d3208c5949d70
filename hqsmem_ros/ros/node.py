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
--lifecycle`), whose transitions call the same steps: configure (models, session, publishers),
activate (subscriptions, services, diagnostics timer), deactivate (those removed, the models
kept), cleanup (the models freed).

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
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, Vector3
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import (HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header

from hqsmem_ros.core import config_check
from hqsmem_ros.core.depth3d import Depth3D, DepthError, pack_points
from hqsmem_ros.core.pipeline import HQSMemPipeline
from hqsmem_ros.io import image_codec
from hqsmem_ros.io.image_codec import ImageDecodeError
from hqsmem_ros.io.outputs import array_3d_fields, stamp_parts, tracked_object_fields
from hqsmem_ros.io.overlay import render_overlay
from hqsmem_ros.msg import ObjectPromptArray, TrackedObject, TrackedObjectArray
from hqsmem_ros.ros import dds_transport
from hqsmem_ros.ros.depth_msgs import add_depth_msg, pointcloud2_msg, set_camera_info_msg
from hqsmem_ros.ros.intake import OrderedIntakeGroup, takes_message_info
from hqsmem_ros.ros.parameters import (COMPONENT_KEYS, NODE_PARAMS, PIPELINE_PARAM_DOCS,  # noqa: F401
                                       RUNTIME_PIPELINE_KEYS, NodeParameters)
from hqsmem_ros.srv import AddObjects, RemoveObjects, Reset
from hqsmem_ros.stream.accounting import FrameAccount, SequenceGaps
from hqsmem_ros.stream.session import Request, StreamSession


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def publisher_key(info) -> Tuple[Optional[bytes], Optional[int]]:
    """(publisher gid, publication sequence number) of an rclpy MessageInfo; None where unset."""
    seq, gid = info.get("publication_sequence_number"), info.get("publisher_gid")
    if not seq or not gid:
        return None, None
    return (bytes(gid.get("data", b"")) if isinstance(gid, dict) else bytes(gid)), int(seq)


# A repeated depth problem (the same message) is logged at most this often; /diagnostics shows
# it at WARN while it lasts.
DEPTH_LOG_EVERY_S = 5.0


def _tracked_object(fields: Dict[str, Any]) -> TrackedObject:
    position, size = fields.pop("position", None), fields.pop("size", None)
    obj = TrackedObject(**fields)
    if position is not None:
        obj.position = Point(x=position[0], y=position[1], z=position[2])
        obj.size = Vector3(x=size[0], y=size[1], z=size[2])
    return obj


class _Tracking(NodeParameters):
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

    def _on_depth(self, msg: Image) -> None:
        session = self.session
        if session is None or session.depth is None:
            return
        try:
            add_depth_msg(session.depth, msg)  # counted there (pairing.depth_received / bad_depth)
        except DepthError as exc:
            self._depth_problem(f"depth image refused: {exc}")

    def _on_depth_camera_info(self, msg: CameraInfo) -> None:
        session = self.session
        if session is None or session.depth is None:
            return
        try:
            set_camera_info_msg(session.depth, msg)
        except DepthError as exc:
            self._depth_problem(f"depth camera_info refused: {exc}")

    def _depth_problem(self, message: str) -> None:
        """A depth problem: /diagnostics at WARN while it lasts, a log line for each new message
        and at most every DEPTH_LOG_EVERY_S for a repeated one."""
        now = time.monotonic()
        self._last_error, self._last_error_time = message, now
        last, when = self._depth_logged
        if message != last or now - when >= DEPTH_LOG_EVERY_S:
            self._depth_logged = (message, now)
            self.get_logger().warning(f"{message}; 2D results continue (repeated at most every "
                                      f"{DEPTH_LOG_EVERY_S:g} s; counts on /diagnostics, depth.*)")

    def _on_prompts(self, msg: ObjectPromptArray) -> None:
        if not msg.prompts:
            return
        self._enqueue(Request("~/prompts", list(msg.prompts), []))

    def _enqueue(self, req: Request) -> bool:
        """Queue a request for the next frame, or refuse it now if it needs no frame to be wrong."""
        reason = self.session.precheck(req)
        if reason:
            self.session.refuse(req, reason)
            return False
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()
        return True

    def _on_add_objects(self, request, response):
        req = Request("~/add_objects", list(request.prompts), [])
        if not req.prompts:
            response.success, response.message = False, "no prompts given"
            return response
        self._submit_and_wait(req)
        response.success, response.message, response.ids = req.success, req.message, req.ids
        return response

    def _on_remove_objects(self, request, response):
        req = Request("~/remove_objects", [], [int(i) for i in request.ids])
        if not req.remove:
            response.success, response.message = False, "no ids given"
            return response
        self._submit_and_wait(req)
        response.success, response.message = req.success, req.message
        response.removed_ids = req.remove if req.success else []
        return response

    def _on_reset(self, request, response):
        with self._pipe_lock:
            cleared = self.session.reset("reset requested on ~/reset")
        response.success = True
        response.message = f"tracker reset; retired ids {cleared}" if cleared else "tracker reset"
        response.cleared_ids = cleared
        return response

    def _submit_and_wait(self, req: Request) -> None:
        if not self._enqueue(req):
            return
        timeout = float(self.get_parameter("service_timeout").value)
        if not req.done.wait(timeout):
            with self._cond:
                if not req.taken:  # no frame came: withdraw it, nothing was applied
                    self._requests.remove(req)
                    self.session.refuse(req, f"no camera frame arrived within {timeout:g} s "
                                             f"(service_timeout); nothing was applied")
                    return
            req.done.wait()  # a frame is being processed with it right now

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

    def _requeue(self, req: Request) -> None:
        """The frame could not be used: the request waits for the next one."""
        with self._cond:
            req.taken = False
            self._requests.appendleft(req)

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
    def _points_wanted(self) -> bool:
        return (self.points_pub is not None and bool(self.get_parameter("publish_points").value)
                and self.points_pub.get_subscription_count() > 0)

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
        if frame3d is not None and frame3d.points is not None and not frame3d.reason:
            # One cloud per result that has 3D (possibly empty); none for a frame without 3D,
            # which says nothing about where obstacles are. In the depth frame, colour stamp.
            cloud = pointcloud2_msg(pack_points(*frame3d.points),
                                    Header(stamp=header.stamp, frame_id=frame3d.frame_id))
            self.points_pub.publish(cloud)
        if self.get_parameter("publish_overlay").value and self.overlay_pub.get_subscription_count() > 0:
            over = render_overlay(rgb, label, result.objects, self.get_parameter("overlay_alpha").value,
                                  step.labels)
            msg = image_codec.fill_image_msg_from_pixels(Image(), over, "rgb8", self._out_buffers.get("overlay"))
            self._out_buffers["overlay"] = msg.data
            msg.header = header
            self.overlay_pub.publish(msg)

    def _note_error(self, message: str) -> None:
        self._last_error, self._last_error_time = message, time.monotonic()
        self.get_logger().error(message)

    @property
    def last_error(self) -> str:
        """The latest error or warning the node reported ('' if none)."""
        return self._last_error or ""

    def _device(self) -> str:
        if self.pipeline is None:
            return "none (not configured)"
        for part in (self.pipeline.tracker, self.pipeline.refiner, self.pipeline.features):
            dev = getattr(part, "device", None)
            if dev is not None:
                return str(dev)
        return "cpu"  # no part has a device of its own: the weight-free models run on the CPU

    def counters(self) -> Dict[str, Any]:
        """Frame accounting (also in /diagnostics): received == processed + dropped + pending +
        in_progress. lost_in_transport: frames that never reached the node (sequence gaps, or the
        middleware's message-lost events); unknown_before_first: frames sent before a
        publisher's first received one (lost, or sent before the subscription matched)."""
        with self._cond:
            session = self.session
            acc = session.account.snapshot() if session is not None else (
                self._final_account or FrameAccount().snapshot())
            return {"received": self.frames_received, "processed": acc["results"],
                    "dropped": acc["dropped"], "pending": len(self._waiting),
                    "in_progress": int(self._busy), "requests_waiting": len(self._requests),
                    "clock_jump_pending": self._reset_requested is not None,
                    "lost_in_transport": max(self.sequence.gaps, self.messages_lost),
                    "sequence_gaps": self.sequence.gaps, "message_lost_events": self.messages_lost,
                    "unknown_before_first": self.sequence.unknown_head,
                    "resets": acc["resets"], "bad_requests": acc["refused_requests"],
                    "while_inactive": self.sequence.paused_gaps,
                    "depth": session.depth_counts() if session is not None else {}}

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        latency, window_frames = self.session.times.take()
        elapsed = max(1e-6, now - self._diag_window_start)
        self._diag_window_start = now
        c = self.counters()
        stats = self.pipeline.stats()
        dropped_total = sum(c["dropped"].values())
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: tracking"
        status.hardware_id = self._device()
        status.level, status.message = self._diagnostic_level(now, c, stats, window_frames / elapsed)
        values = {
            "frames_received": c["received"], "frames_processed": c["processed"],
            "frames_dropped": dropped_total, "frames_pending": c["pending"],
            "messages_lost_in_transport": c["lost_in_transport"],
            "frames_unknown_before_first": c["unknown_before_first"],
            "rate_hz": round(window_frames / elapsed, 3), "objects": stats["objects"],
            "object_ids": list(self.pipeline.object_ids), "resets": c["resets"],
            "memory_size": stats["memory_size"], "memory_capacity": stats["memory_capacity"],
            "memory_bytes": stats["memory_bytes"], "device": self._device(),
            "tracker": stats["tracker"], "refiner": stats["refiner"], "features": stats["features"],
            "ablation": stats["ablation"], "refine_mode": stats["refine_mode"],
            "last_error": self._last_error or "",
            "random_weights": ", ".join(self._random_weight_parts) or "none",
        }
        values.update({f"dropped.{reason}": count for reason, count in sorted(c["dropped"].items())})
        values.update({f"refused_requests.{src}": count for src, count in sorted(c["bad_requests"].items())})
        values.update({f"latency_ms.{stage}": round(ms, 3) for stage, ms in sorted(latency.items())})
        if self.session.depth is not None:
            values.update({f"depth.{k}": v for k, v in sorted(c["depth"].items())})
            values["depth.last_error"] = self.session.depth.last_error
        if c["while_inactive"]:
            values["frames_sent_while_inactive"] = c["while_inactive"]
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [status]
        self.diag_pub.publish(arr)

    def _diagnostic_level(self, now: float, c, stats, rate: float) -> Tuple[bytes, str]:
        recent_error = self._last_error and now - self._last_error_time < 2 * self.get_parameter(
            "diagnostics_period").value + 1.0
        transport_loss = dds_transport.loss_warning(c["received"], c["lost_in_transport"])
        if recent_error:
            return DiagnosticStatus.WARN, self._last_error[:500]
        if transport_loss:
            return DiagnosticStatus.WARN, transport_loss
        if self._random_weight_parts:
            return DiagnosticStatus.WARN, (f"random weights in {', '.join(self._random_weight_parts)}: "
                                           "outputs are meaningless (allow_random_weights)")
        if c["received"] == 0:
            return DiagnosticStatus.WARN, f"no image received on {self.image_sub.topic_name}"
        return DiagnosticStatus.OK, (f"{stats['objects']} objects, {rate:.1f} frames/s, "
                                     f"{sum(c['dropped'].values())} dropped of {c['received']}")

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


class HQSMemLifecycleNode(_Tracking, LifecycleNode):
    """`hqsmem_node --lifecycle`: unconfigured at start; ~/change_state drives it (module
    docstring). A failed configure (a missing checkpoint, CUDA asked for on a machine
    without it, a bad parameter) answers FAILURE with the reason logged and stays
    unconfigured."""

    def on_configure(self, state):
        try:
            self._configure()
        except Exception as exc:  # any model/config error: refuse the transition, say why
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            self._last_error, self._last_error_time = f"configure failed: {exc}", time.monotonic()
            self._cleanup()
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info("configured: models loaded")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        self._activate()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state):
        self._deactivate("deactivated")
        self.get_logger().info("deactivated: subscriptions and services removed, models kept")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state):
        self._cleanup()
        self.get_logger().info("cleaned up: models freed")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        if self._active_entities:
            self._deactivate("shutdown")
        if self.pipeline is not None:
            self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state):
        return self.on_shutdown(state)
