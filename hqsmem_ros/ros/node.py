"""The HQ-SMem tracking node: a thin ROS 2 adapter over hqsmem_ros.core.pipeline.HQSMemPipeline.

Topics (relative names, so a namespace and remappings apply):
  in   image (sensor_msgs/Image) or image/compressed (sensor_msgs/CompressedImage),
       camera_info (optional), ~/prompts (hqsmem_ros/ObjectPromptArray)
  out  ~/masks (mono16 label image, pixel = object id), ~/objects (TrackedObjectArray),
       ~/overlay (rgb8, optional), /diagnostics
Services: ~/add_objects, ~/remove_objects, ~/reset.

Threading: image callbacks start one at a time, in the order the executor took the messages
(_OrderedIntakeGroup). The callback that finds the node idle lets the next callback start, then
processes its frame itself and any frame that arrived meanwhile (no hand-over to another thread,
whose wake-up cost more than the node's own work). Callbacks arriving while a frame is
processed only leave their message in a buffer of frame_queue_size frames (1 by default, so the
node always works on the newest frame): a frame pushed out of it is counted as dropped
("replaced"), as is every frame that cannot be processed (with its reason), so frames received =
results published + frames dropped.
Frames that never reached the node (overwritten in the DDS history, lost on the network) show
as gaps in the publisher's sequence numbers and are counted as lost in transport.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.callback_groups import CallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import (HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from hqsmem_ros.core.config import ConfigError, PipelineConfig
from hqsmem_ros.core.pipeline import FrameError, HQSMemPipeline, ObjectPrompt, PromptError
from hqsmem_ros.io.prompts_file import PromptsFileError, load_prompts_file
from hqsmem_ros.msg import ObjectPromptArray, TrackedObject, TrackedObjectArray
from hqsmem_ros.io import image_codec, prompt_msgs
from hqsmem_ros.io.prompt_msgs import MAX_ID
from hqsmem_ros.io.image_codec import ImageDecodeError
from hqsmem_ros.io.overlay import render_overlay
from hqsmem_ros.srv import AddObjects, RemoveObjects, Reset



@dataclasses.dataclass
class _NodeParam:
    default: Any
    description: str
    runtime: bool  # may change while running
    choices: Tuple[str, ...] = ()
    int_range: Optional[Tuple[int, int]] = None
    float_range: Optional[Tuple[float, float]] = None


NODE_PARAMS: Dict[str, _NodeParam] = {
    "input_type": _NodeParam("raw", "Subscribe to 'image' (raw) or 'image/compressed' (compressed)",
                             False, choices=("raw", "compressed")),
    "qos_reliability": _NodeParam("best_effort", "Reliability of the image subscription "
                                  "(best_effort matches camera drivers' sensor-data QoS)", False,
                                  choices=("best_effort", "reliable")),
    "qos_depth": _NodeParam(5, "History depth of the image subscription", False, int_range=(1, 100)),
    "frame_queue_size": _NodeParam(1, "Frames kept waiting while one is processed: 1 = only the "
                                   "newest (live cameras); more = process every frame in order "
                                   "while the queue has room (bag replays at full rate); a frame "
                                   "pushed out is counted as dropped (replaced)", False,
                                   int_range=(1, 1000)),
    "publish_overlay": _NodeParam(True, "Publish ~/overlay (only computed while someone subscribes)", True),
    "overlay_alpha": _NodeParam(0.5, "Mask opacity in ~/overlay", True, float_range=(0.0, 1.0)),
    "initial_mask": _NodeParam("", "Label PNG (pixel value = object id) that seeds the objects "
                               "on the first frame; empty = start with no objects", False),
    "prompts_file": _NodeParam("", "YAML prompts file (docs/prompts.md), the format of `hqsmem bag "
                               "--prompts`: objects to start, correct or remove at given stamps "
                               "(or indices of the frames this node processes)", False),
    "use_camera_info": _NodeParam(False, "Subscribe to camera_info and check its size against the images", False),
    "diagnostics_period": _NodeParam(1.0, "Seconds between /diagnostics messages", False,
                                     float_range=(0.1, 60.0)),
    "reset_on_time_jump": _NodeParam(True, "Reset the tracker when image stamps or the clock go "
                                     "back (a looping bag); otherwise such frames are dropped", True),
    "service_timeout": _NodeParam(5.0, "Seconds ~/add_objects and ~/remove_objects wait for a "
                                  "frame to apply the request to", True, float_range=(0.1, 600.0)),
    "allow_random_weights": _NodeParam(False, "Start even if a model has random_weights: true "
                                       "(untrained weights: masks are meaningless; speed benchmarks only)",
                                       False),
}

# What each pipeline key means (descriptions of the "pipeline.<key>" parameters).
PIPELINE_PARAM_DOCS: Dict[str, str] = {
    "ablation": "Paper row: full | base | base_sam | base_smem | base_hqtf (the three switches "
                "below override it when set)",
    "refine": "Refiner use: off | always | gated (unset: from ablation)",
    "teacher_forcing": "Feed accepted refined masks back to the tracker (unset: from ablation)",
    "smart_memory": "Use the smart long-term memory (unset: from ablation)",
    "device": "auto | cpu | cuda | cuda:N",
    "precision": "fp32 | fp16 | bf16 (half precision on CUDA only)",
    "memory_capacity": "Smart memory size K (frames)",
    "memory_lambda": "Recency weight of the memory eviction score",
    "tau_memory": "Smart-memory similarity threshold",
    "tau_verify": "Refined-mask acceptance threshold (verification)",
    "memory_interval": "A memory candidate every N processed frames",
    "memory_interval_s": "A memory candidate every S seconds of image stamps (unset: use memory_interval)",
    "sequence_length": "Known sequence length L: candidates every L/30 frames (offline rule; unset: live)",
    "min_refine_area": "Coarse masks smaller than this (pixels) are not refined",
    "process_max_side": "Downscale frames so the longer side is at most this before the models (0: no downscaling)",
}

# Pipeline keys (parameters "pipeline.<key>") that are safe to change between two frames.
RUNTIME_PIPELINE_KEYS = HQSMemPipeline.RUNTIME_KEYS
COMPONENT_KEYS = ("tracker", "refiner", "features")


def stamp_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


@dataclasses.dataclass
class _Request:
    """A prompt/removal request waiting for the next frame (from the topic or a service)."""
    source: str
    prompts: List[Any]  # hqsmem_ros/ObjectPrompt messages
    remove: List[int]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    taken: bool = False
    cancelled: bool = False
    success: bool = False
    message: str = ""
    ids: List[int] = dataclasses.field(default_factory=list)


class HQSMemNode(Node):
    def __init__(self, node_name: str = "hqsmem_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        self.config = self._pipeline_config_from_parameters()
        self._random_weight_parts = self._check_random_weights(self.config)
        self.pipeline = HQSMemPipeline(self.config)

        # Ids ever given out in this run (never reused) and free-text labels per id.
        self._used_ids: set = set()
        self._live_ids: Tuple[int, ...] = ()  # snapshot for the callbacks, updated by the worker
        self._frame_shape: Optional[Tuple[int, int]] = None
        self._busy = False  # a callback is processing frames (the "leader"); guarded by _cond
        self._labels: Dict[int, str] = {}
        self._initial_labels = self._load_initial_mask(self.get_parameter("initial_mask").value)
        self._seed_pending = self._initial_labels is not None
        self._schedule = self._load_prompts_file(self.get_parameter("prompts_file").value)

        # One-slot frame buffer and request queue, shared by the callbacks and the worker.
        self._cond = threading.Condition()
        # Frames waiting while another is processed: (message, perf_counter() at arrival). One
        # slot by default (always the newest frame); frame_queue_size > 1 for replays.
        self._waiting: deque = deque()
        self._queue_size = int(self.get_parameter("frame_queue_size").value)
        # Benchmarks set this to a list to get one timing record per processed frame.
        self.frame_log: Optional[List[Dict[str, float]]] = None
        self._out_buffers: Dict[str, Any] = {}  # publisher -> array('B') reused for its data
        self._requests: deque = deque()
        self._pending_config: Optional[PipelineConfig] = None
        self._reset_requested: Optional[float] = None  # the ROS time after a backward clock jump
        self._pipe_lock = threading.Lock()
        self._stop = False

        # Counters (frames_received == frames_processed + sum(dropped.values()) at rest).
        self._stats_lock = threading.Lock()
        self.frames_received = 0
        self.frames_processed = 0
        self.dropped: Counter = Counter()
        self.bad_requests: Counter = Counter()
        self.messages_lost = 0  # the middleware's message-lost event (where it fires)
        self.sequence_gaps = 0  # frames missing from publishers' sequence numbers
        self._last_sequence: Dict[bytes, int] = {}  # publisher gid -> last sequence number seen
        self.resets = 0
        self._frame_index = 0
        self._last_stamp: Optional[float] = None
        self._last_error: Optional[str] = None
        self._last_error_time = 0.0
        self._stage_sums: Counter = Counter()
        self._stage_frames = 0
        self._last_result_stamp: Optional[float] = None
        self._camera_info: Optional[CameraInfo] = None
        self._camera_info_mismatch: Optional[Tuple[int, int, int, int]] = None
        self._diag_window_start = time.monotonic()
        self._diag_processed_at_start = 0

        # Publishers.
        self.masks_pub = self.create_publisher(Image, "~/masks", 10)
        self.objects_pub = self.create_publisher(TrackedObjectArray, "~/objects", 10)
        self.overlay_pub = self.create_publisher(Image, "~/overlay", 2)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        # Subscriptions: images in their own group so a waiting service never delays them.
        reliability = (ReliabilityPolicy.RELIABLE if self.get_parameter("qos_reliability").value == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.get_parameter("qos_depth").value,
                         reliability=reliability, durability=qos_profile_sensor_data.durability)
        image_group = _OrderedIntakeGroup()
        msg_type, topic = ((CompressedImage, "image/compressed")
                           if self.get_parameter("input_type").value == "compressed" else (Image, "image"))
        # Sequence numbers come with the message info (rclpy on Iron and later).
        on_image = self._on_image_with_info if _takes_message_info() else self._on_image
        try:  # count messages the middleware reports lost (not every RMW supports the event)
            self.image_sub = self.create_subscription(
                msg_type, topic, on_image, qos, callback_group=image_group,
                event_callbacks=self._event_callbacks())
        except Exception:
            self.image_sub = self.create_subscription(msg_type, topic, on_image, qos,
                                                      callback_group=image_group)
        if self.get_parameter("use_camera_info").value:
            self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, qos,
                                     callback_group=image_group)
        service_group = ReentrantCallbackGroup()
        self.create_subscription(ObjectPromptArray, "~/prompts", self._on_prompts, 10,
                                 callback_group=service_group)
        self.create_service(AddObjects, "~/add_objects", self._on_add_objects, callback_group=service_group)
        self.create_service(RemoveObjects, "~/remove_objects", self._on_remove_objects,
                            callback_group=service_group)
        self.create_service(Reset, "~/reset", self._on_reset, callback_group=service_group)
        self.create_timer(self.get_parameter("diagnostics_period").value, self._publish_diagnostics,
                          callback_group=service_group)
        # Wakes the executor when the image callbacks may start again before one returned.
        self._intake_wake = self.create_guard_condition(lambda: None, callback_group=service_group)
        self._install_clock_jump_handler()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._started = True
        stats = self.pipeline.stats()
        input_type = self.get_parameter('input_type').value
        self.get_logger().info(
            f"tracking {self.image_sub.topic_name} ({input_type}"
            + (f", JPEG decoding: {image_codec.jpeg_decoder()}" if input_type == "compressed" else "")
            + f", {self.get_parameter('qos_reliability').value}) with tracker={stats['tracker']} "
            f"refiner={stats['refiner']} features={stats['features']} ablation={stats['ablation']} "
            f"device={self._device()}")
        if self._random_weight_parts:
            self.get_logger().warning(
                f"RANDOM WEIGHTS in {', '.join(self._random_weight_parts)} (allow_random_weights is "
                "true): the models are untrained and the masks and objects this node publishes are "
                "MEANINGLESS; use this only to measure speed")

    # ---------------------------------------------------------------- parameters
    def _declare_parameters(self) -> None:
        self._declared: List[str] = []
        for name, p in NODE_PARAMS.items():
            desc = ParameterDescriptor(description=p.description, read_only=not p.runtime)
            if p.choices:
                desc.additional_constraints = "one of: " + ", ".join(p.choices)
            if p.int_range:
                desc.integer_range = [IntegerRange(from_value=p.int_range[0], to_value=p.int_range[1], step=1)]
            if p.float_range:
                desc.floating_point_range = [FloatingPointRange(
                    from_value=p.float_range[0], to_value=p.float_range[1], step=0.0)]
            self._declare(name, p.default, desc)
            self._check_node_param(name, self.get_parameter(name).value, startup=True)

        defaults = PipelineConfig()
        overrides = getattr(self, "_parameter_overrides", {}) or {}
        for f in dataclasses.fields(PipelineConfig):
            name = f"pipeline.{f.name}"
            runtime = f.name in RUNTIME_PIPELINE_KEYS
            why = "" if runtime else " (fixed while running: restart the node to change it)"
            if f.name in COMPONENT_KEYS:
                default = getattr(defaults, f.name)
                self._declare(f"{name}.type", default["type"], ParameterDescriptor(
                    description=f"Registered {f.name} model name{why}", read_only=True))
                # The component's own constructor parameters: whatever the parameter file gives.
                for key in sorted(k for k in overrides if k.startswith(f"{name}.") and k != f"{name}.type"):
                    self._declare(key, overrides[key].value, ParameterDescriptor(
                        description=f"{f.name} model parameter{why}", read_only=True, dynamic_typing=True))
                for key, value in default.items():  # defaults of the default component
                    if key != "type" and not self.has_parameter(f"{name}.{key}"):
                        self._declare(f"{name}.{key}", value, ParameterDescriptor(
                            description=f"{f.name} model parameter{why}", read_only=True, dynamic_typing=True))
                continue
            value = getattr(defaults, f.name)
            meaning = PIPELINE_PARAM_DOCS.get(f.name, f"Pipeline setting '{f.name}' (hqsmem_ros/core/config.py)")
            desc = ParameterDescriptor(description=meaning + why, read_only=not runtime)
            if value is None:
                desc.dynamic_typing = True  # optional: unset = the ablation preset / off
            self._declare(name, value, desc)

    def _check_random_weights(self, cfg: PipelineConfig) -> List[str]:
        """Untrained models publish plausible-looking garbage: refuse them unless asked for."""
        parts = [f"pipeline.{key} ({getattr(cfg, key).get('type')})" for key in COMPONENT_KEYS
                 if getattr(cfg, key).get("random_weights") is True]
        if parts and not self.get_parameter("allow_random_weights").value:
            raise ConfigError(
                f"{', '.join(parts)}: random_weights is true, so the node would publish masks from "
                "untrained models. Give the models' checkpoints, or set the node parameter "
                "allow_random_weights:=true to run anyway (speed benchmarks only)")
        return parts

    def _declare(self, name: str, default: Any, desc: ParameterDescriptor) -> None:
        self._declared.append(name)
        try:
            self.declare_parameter(name, default, desc)
        except Exception as exc:  # wrong type in the parameter file, e.g. 1 for a float
            raise ConfigError(f"parameter {name!r}: {exc}") from exc

    @staticmethod
    def _plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "array":
            return [HQSMemNode._plain(v) for v in value]
        return value

    def _pipeline_dict(self, changes: Dict[str, Any] = None) -> Dict[str, Any]:
        params = {name: self._plain(self.get_parameter(name).value) for name in self._declared}
        params.update(changes or {})
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(PipelineConfig):
            if f.name in COMPONENT_KEYS:
                prefix = f"pipeline.{f.name}."
                out[f.name] = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
                continue
            value = params.get(f"pipeline.{f.name}")
            if value == "" and f.name in ("refine", "memory_interval_s", "sequence_length",
                                          "teacher_forcing", "smart_memory", "process_max_side"):
                value = None
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(
                    getattr(PipelineConfig(), f.name), float):
                value = float(value)  # "tau_verify: 1" in YAML is an integer
            out[f.name] = value
        return out

    def _pipeline_config_from_parameters(self) -> PipelineConfig:
        try:
            return PipelineConfig.from_dict(self._pipeline_dict())
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"invalid pipeline parameters: {exc}") from exc

    def _check_node_param(self, name: str, value: Any, startup: bool = False) -> Optional[str]:
        p = NODE_PARAMS[name]
        reason = None
        if p.choices and value not in p.choices:
            reason = f"{name} must be one of {', '.join(p.choices)}, got {value!r}"
        if name == "initial_mask" and value and not Path(value).is_file():
            reason = f"initial_mask: file not found: {value}"
        if reason and startup:
            raise ConfigError(reason)
        return reason

    def _on_set_parameters(self, params) -> SetParametersResult:
        changes: Dict[str, Any] = {}
        for p in params:
            if p.name in NODE_PARAMS:
                reason = self._check_node_param(p.name, p.value)
                if reason:
                    return self._refuse_parameter(reason)
            elif p.name.startswith("pipeline."):
                key = p.name.split(".")[1]
                if key not in RUNTIME_PIPELINE_KEYS:
                    return self._refuse_parameter(
                        f"{p.name} cannot change while the node runs (models and memory are built "
                        "from it at start); restart the node with the new value")
                changes[p.name] = self._plain(p.value)
        if changes:
            try:
                new_cfg = PipelineConfig.from_dict(self._pipeline_dict(changes))
            except (ConfigError, TypeError) as exc:
                return self._refuse_parameter(f"invalid value: {exc}")
            with self._cond:
                self._pending_config = new_cfg
        return SetParametersResult(successful=True)

    def _refuse_parameter(self, reason: str) -> SetParametersResult:
        self._note_error(f"parameter change refused: {reason}")
        return SetParametersResult(successful=False, reason=reason)

    def _apply_config(self, cfg: PipelineConfig) -> None:
        """Between two frames: thresholds and switches the pipeline reads on every frame."""
        try:
            self.pipeline.update_config(cfg)
        except ConfigError as exc:  # validated in the parameter callback; kept as a safety net
            self._note_error(f"parameter change not applied: {exc}")
            return
        self.config = cfg
        self.get_logger().info("pipeline parameters updated")

    # ---------------------------------------------------------------- initial mask
    def _load_initial_mask(self, path: str) -> Optional[np.ndarray]:
        if not path:
            return None
        from PIL import Image as PILImage
        try:
            with PILImage.open(path) as im:
                if im.mode not in ("P", "L", "I;16", "I;16B", "I;16L", "I"):
                    raise ConfigError(f"initial_mask {path}: a label PNG must be single-channel or "
                                      f"palette (pixel = object id), got mode {im.mode}")
                labels = np.array(im)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"initial_mask {path}: cannot read it as an image: {exc}") from exc
        if labels.max() > MAX_ID or labels.min() < 0:
            raise ConfigError(f"initial_mask {path}: ids must be in 0..{MAX_ID}")
        if not labels.any():
            raise ConfigError(f"initial_mask {path}: no object (every pixel is 0)")
        return labels.astype(np.uint16)

    def _load_prompts_file(self, path: str):
        if not path:
            return None
        try:
            return load_prompts_file(path)
        except PromptsFileError as exc:
            raise ConfigError(f"prompts_file: {exc}") from exc

    def _file_prompts(self, stamp_msg, shape):
        """Entries of prompts_file due on this frame: (entries, prompts, removals, labels)."""
        if self._schedule is None:
            return [], [], [], {}
        due = self._schedule.due(self._frame_index, stamp_msg.sec * 1_000_000_000 + stamp_msg.nanosec)
        if not due:
            return [], [], [], {}
        try:
            prompts, remove, labels = self._schedule.prompts_for(due, shape)
        except PromptsFileError as exc:
            self._schedule.mark_applied(due)  # a bad entry is reported once, not retried forever
            self._note_error(f"prompts_file entry not used: {exc}")
            return [], [], [], {}
        reused = sorted(p.id for p in prompts if p.id in self._used_ids and p.id not in self._live_ids)
        if reused:
            self._note_error(f"prompts_file: ids {reused} were used before and are never reused; skipped")
            prompts = [p for p in prompts if p.id not in reused]
        remove = [i for i in remove if i in self._live_ids]
        return due, prompts, remove, labels

    def _seed_prompts(self, shape) -> List[ObjectPrompt]:
        labels = self._initial_labels
        if labels.shape != tuple(shape):
            raise PromptError(f"initial_mask is {labels.shape[1]}x{labels.shape[0]} but the camera "
                              f"image is {shape[1]}x{shape[0]}")
        prompts = []
        for value in (int(v) for v in np.unique(labels) if v):
            oid = value if value not in self._used_ids else self._fresh_id(prompts)
            prompts.append(ObjectPrompt(id=oid, mask=labels == value))
        return prompts

    # ---------------------------------------------------------------- callbacks
    def _event_callbacks(self):
        try:
            from rclpy.event_handler import SubscriptionEventCallbacks
        except ImportError:  # Humble
            from rclpy.qos_event import SubscriptionEventCallbacks

        def on_lost(event):
            with self._stats_lock:
                self.messages_lost = int(event.total_count)
        try:
            return SubscriptionEventCallbacks(message_lost=on_lost)
        except TypeError:
            return None

    def _on_image_with_info(self, msg, info) -> None:
        self._count_sequence_gap(info)
        self._on_image(msg)

    def _count_sequence_gap(self, info) -> None:
        seq, gid = info.get("publication_sequence_number"), info.get("publisher_gid")
        if not seq or not gid:  # the RMW does not fill them in
            return
        key = bytes(gid.get("data", b"")) if isinstance(gid, dict) else bytes(gid)
        with self._stats_lock:
            last = self._last_sequence.get(key)
            # The first message of a publisher has no reference; a sequence going back is a
            # restarted publisher (same gid is unlikely) and starts over.
            if last is not None and seq > last + 1:
                self.sequence_gaps += seq - last - 1
            self._last_sequence[key] = seq

    def _on_image(self, msg) -> None:
        arrived = time.perf_counter()
        with self._cond:
            self.frames_received += 1
            if self._stop:
                with self._stats_lock:  # (lock order everywhere: _cond, then _stats_lock)
                    self.dropped["shutdown"] += 1
                return
            if self._busy:  # another callback is processing: leave only the newest frame
                if len(self._waiting) >= self._queue_size:
                    self._waiting.popleft()
                    with self._stats_lock:
                        self.dropped["replaced"] += 1
                self._waiting.append((msg, arrived))
                return
            self._busy = True
        self._release_intake()  # later frames may arrive (in order) while this one is processed
        self._lead(msg, arrived)

    def _release_intake(self) -> None:
        group = self.image_sub.callback_group
        if isinstance(group, _OrderedIntakeGroup) and group.release():
            try:
                self._intake_wake.trigger()  # the executor re-checks which callbacks may start
            except Exception:  # the node is being destroyed: nothing is waiting for frames
                pass

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    def _on_prompts(self, msg: ObjectPromptArray) -> None:
        if not msg.prompts:
            return
        req = _Request("~/prompts", list(msg.prompts), [])
        reason = self._precheck(req)
        if reason:
            self._request_failed(req, reason)
            return
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()

    def _on_add_objects(self, request, response):
        req = _Request("~/add_objects", list(request.prompts), [])
        if not req.prompts:
            response.success, response.message = False, "no prompts given"
            return response
        self._submit_and_wait(req)
        response.success, response.message, response.ids = req.success, req.message, req.ids
        return response

    def _on_remove_objects(self, request, response):
        req = _Request("~/remove_objects", [], [int(i) for i in request.ids])
        if not req.remove:
            response.success, response.message = False, "no ids given"
            return response
        self._submit_and_wait(req)
        response.success, response.message = req.success, req.message
        response.removed_ids = req.remove if req.success else []
        return response

    def _on_reset(self, request, response):
        with self._pipe_lock:
            cleared = self._reset_tracker("reset requested on ~/reset")
        response.success = True
        response.message = f"tracker reset; retired ids {cleared}" if cleared else "tracker reset"
        response.cleared_ids = cleared
        return response

    def _submit_and_wait(self, req: _Request) -> None:
        reason = self._precheck(req)
        if reason:
            self._request_failed(req, reason)
            return
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()
        timeout = float(self.get_parameter("service_timeout").value)
        if not req.done.wait(timeout):
            with self._cond:
                if not req.taken:  # no frame came: withdraw it, nothing was applied
                    req.cancelled = True
                    self._requests.remove(req)
                    self._request_failed(req, f"no camera frame arrived within {timeout:g} s "
                                              f"(service_timeout); nothing was applied")
                    return
            req.done.wait()  # a frame is being processed with it right now

    def _precheck(self, req: _Request) -> Optional[str]:
        """Checks that need no frame: ids, duplicates, box shape, mask encoding, removals."""
        reason = prompt_msgs.problem_without_frame(req.prompts, self._used_ids, set(self._live_ids))
        if reason:
            return reason
        seen_remove = set()
        live = set(self._live_ids)
        for oid in req.remove:
            if oid in seen_remove:
                return f"id {oid} appears twice"
            seen_remove.add(oid)
            if oid not in live:
                return f"cannot remove id {oid}: not tracked (tracked: {sorted(live)})"
        return None

    def _request_failed(self, req: _Request, reason: str) -> None:
        req.success, req.message = False, reason
        with self._stats_lock:
            self.bad_requests[req.source] += 1
        self._note_error(f"{req.source}: refused: {reason}")
        req.done.set()

    # ---------------------------------------------------------------- processing
    def _lead(self, msg, arrived: float) -> None:
        """Process `msg`, then every frame left in the slot meanwhile; only one caller at a time
        (the one that set _busy)."""
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
                self._drop("internal_error", f"frame dropped: unexpected {type(exc).__name__}: {exc}")
                if req is not None and not req.done.is_set():
                    self._request_failed(req, f"internal error: {exc}")
            with self._cond:
                if not self._waiting or self._stop:
                    self._busy = False
                    self._cond.notify_all()
                    return
                msg, arrived = self._waiting.popleft()

    def _process(self, msg, req: Optional[_Request], arrived: float) -> None:
        stamp = stamp_seconds(msg.header.stamp)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            rgb = (image_codec.compressed_to_rgb(msg) if isinstance(msg, CompressedImage)
                   else image_codec.image_to_rgb(msg))
        except ImageDecodeError as exc:
            self._drop("bad_image", f"frame at {stamp:.6f} dropped: {exc}")
            if req is not None:
                self._requeue(req)
            return
        t_decode = time.perf_counter() - t0
        self._check_camera_info(rgb.shape[:2])

        if self._last_stamp is not None and stamp < self._last_stamp:
            if self.get_parameter("reset_on_time_jump").value:
                self._reset_tracker(f"image stamps went back from {self._last_stamp:.6f} to "
                                    f"{stamp:.6f} (looping bag?)")
            else:
                self._drop("stamp_backwards", f"frame at {stamp:.6f} dropped: stamp older than "
                           f"the previous frame's {self._last_stamp:.6f}")
                if req is not None:
                    self._requeue(req)
                return
        if self._frame_shape is not None and rgb.shape[:2] != self._frame_shape:
            h0, w0 = self._frame_shape
            self._reset_tracker(f"image size changed from {w0}x{h0} to {rgb.shape[1]}x{rgb.shape[0]}")

        seeds: List[ObjectPrompt] = []
        if self._seed_pending:
            self._seed_pending = False
            try:
                seeds = self._seed_prompts(rgb.shape[:2])
            except PromptError as exc:
                self._note_error(f"initial_mask not used: {exc}")
        file_due, file_prompts, file_remove, file_labels = self._file_prompts(msg.header.stamp, rgb.shape[:2])
        seeds = seeds + file_prompts
        extra: List[ObjectPrompt] = []
        labels: Dict[int, str] = {}
        if req is not None:
            try:
                extra, labels = self._to_pipeline_prompts(req, rgb.shape[:2], seeds)
            except (PromptError, ImageDecodeError) as exc:
                self._request_failed(req, str(exc))
                req = None
        # A bad request must not cost the frame nor the seeds: retry without what was refused.
        attempts = []
        if req is not None:
            attempts.append((seeds + extra, list(req.remove) + file_remove, req))
        if seeds or file_remove:
            attempts.append((seeds, file_remove, None))
        attempts.append(([], [], None))
        result = None
        t_pipe_start, cpu_pipe_start = time.perf_counter(), time.thread_time()
        for prompts, remove, with_req in attempts:
            try:
                result = self.pipeline.process(rgb, stamp, prompts=prompts, remove=remove)
                break
            except PromptError as exc:
                if with_req is not None:
                    self._request_failed(with_req, str(exc))
                    req = None
                elif prompts or remove:
                    self._note_error(f"initial_mask / prompts_file not used: {exc}")
            except FrameError as exc:
                self._drop("bad_frame", f"frame at {stamp:.6f} dropped: {exc}")
                if req is not None:
                    self._requeue(req)
                return
        if result is None:  # cannot happen: the last attempt has no prompts
            self._drop("bad_frame", f"frame at {stamp:.6f} dropped: no attempt succeeded")
            return
        if seeds and prompts:
            self.get_logger().info(f"initial_mask seeded objects {[p.id for p in seeds]}")
        if req is None:
            labels = {}
        self._frame_shape = rgb.shape[:2]
        self._live_ids = tuple(self.pipeline.object_ids)

        self._used_ids.update(p.id for p in prompts)
        self._labels.update(labels)
        if file_due:
            self._schedule.mark_applied(file_due)
            applied = {p.id for p in prompts}
            self._labels.update({i: t for i, t in file_labels.items() if i in applied})
            if applied & {p.id for p in file_prompts} or (file_remove and remove):
                self.get_logger().info(f"prompts_file: started {sorted(applied & {p.id for p in file_prompts})}, "
                                       f"removed {sorted(remove)} on frame {self._frame_index}")
        if req is not None:
            req.success = True
            what = []
            if req.ids:
                what.append(f"objects {req.ids} started")
            if req.remove:
                what.append(f"objects {req.remove} removed (ids retired)")
                for oid in req.remove:
                    self._labels.pop(oid, None)
            req.message = f"{' and '.join(what)} on frame {self._frame_index} (stamp {stamp:.6f})"
            self.get_logger().info(f"{req.source}: {req.message}")
            req.done.set()

        t1, cpu1 = time.perf_counter(), time.thread_time()
        t_pipeline = t1 - t_pipe_start
        self._publish(msg.header, rgb, result)
        t_end, cpu_end = time.perf_counter(), time.thread_time()
        t_publish = t_end - t1
        self._last_stamp = stamp
        # Node overhead: from the image callback to the last publish, the pipeline excluded.
        overhead = (t_end - arrived) - t_pipeline
        with self._stats_lock:
            self.frames_processed += 1
            self._frame_index += 1
            self._last_result_stamp = stamp
            for stage, seconds in result.timings.items():
                self._stage_sums[stage] += seconds
            self._stage_sums["wait"] += t0 - arrived
            self._stage_sums["decode"] += t_decode
            self._stage_sums["publish"] += t_publish
            self._stage_sums["node_total"] += t_end - t0
            self._stage_sums["node_overhead"] += overhead
            self._stage_frames += 1
        if self.frame_log is not None:
            self.frame_log.append({"stamp": stamp, "wait": t0 - arrived, "decode": t_decode,
                                   "pipeline": t_pipeline, "pipeline_total": result.timings.get("total", 0.0),
                                   "publish": t_publish, "overhead": overhead,
                                   # CPU time of this thread: the same work without waits for a core
                                   "overhead_cpu": (cpu_end - cpu0) - (cpu1 - cpu_pipe_start)})

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

    def _requeue(self, req: _Request) -> None:
        """The frame could not be used: the request waits for the next one."""
        with self._cond:
            req.taken = False
            self._requests.appendleft(req)

    def _fresh_id(self, pending: Sequence[ObjectPrompt] = ()) -> int:
        taken = self._used_ids | set(self.pipeline.object_ids) | {p.id for p in pending}
        oid = max(taken) + 1 if taken else 1
        if oid > MAX_ID:
            raise PromptError(f"all {MAX_ID} object ids of this run are used; restart the node")
        return oid

    def _to_pipeline_prompts(self, req: _Request, shape, pending: Sequence[ObjectPrompt]):
        """hqsmem_ros/ObjectPrompt messages -> pipeline prompts, fresh ids for id 0."""
        h, w = shape
        out: List[ObjectPrompt] = []
        labels: Dict[int, str] = {}
        for k, p in enumerate(req.prompts):
            oid = int(p.id) or self._fresh_id(list(pending) + out)
            if int(p.id) and oid in self._used_ids and oid not in self.pipeline.object_ids:
                raise PromptError(f"prompt {k}: id {oid} was used before; ids are never reused")
            mask = None
            if p.mask.width > 0 and p.mask.height > 0:
                mask = prompt_msgs.prompt_mask(p.mask, oid, (h, w), f"prompt {k}")
            box = prompt_msgs.prompt_box(p, (h, w), f"prompt {k}")
            out.append(ObjectPrompt(id=oid, mask=mask, box=box, points=prompt_msgs.click_points(p)))
            if p.label:
                labels[oid] = p.label
        req.ids = [q.id for q in out]
        return out, labels

    def _reset_tracker(self, why: str) -> List[int]:
        """Forget all objects and memory (caller holds _pipe_lock). Returns the retired ids."""
        cleared = list(self.pipeline.object_ids)
        self._used_ids.update(cleared)
        self.pipeline.reset()
        self._live_ids = ()
        self._frame_shape = None
        self._last_stamp = None
        self._labels.clear()
        self._seed_pending = self._initial_labels is not None
        with self._stats_lock:
            self.resets += 1
        self.get_logger().warning(f"tracker reset: {why}; retired ids {cleared}"
                                  + ("; initial_mask seeds again on the next frame" if self._seed_pending else ""))
        return cleared

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
        if self._last_stamp is not None and self._last_stamp > clock_now:
            self._reset_tracker(f"the ROS clock jumped back to {clock_now:.6f}, before the last "
                                f"frame's stamp {self._last_stamp:.6f} (looping bag with use_sim_time?)")
        else:
            self.get_logger().info(f"the ROS clock jumped back to {clock_now:.6f}; the tracker "
                                   "holds no frame stamped after it, so no reset is needed")

    # ---------------------------------------------------------------- output
    def _publish(self, header, rgb: np.ndarray, result) -> None:
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
        arr.frame_index = self._frame_index
        arr.height, arr.width = int(label.shape[0]), int(label.shape[1])
        nan = float("nan")
        for o in result.objects:
            t = TrackedObject()
            t.id = int(o.id)
            t.label = self._labels.get(o.id, "")
            t.x_min, t.y_min, t.x_max, t.y_max = (float(v) for v in o.box)
            t.score = float(o.score)
            t.visible = bool(o.visible)
            t.refined = bool(o.refined)
            t.area = int(o.area)
            t.centroid_x, t.centroid_y = (float(o.centroid[0]), float(o.centroid[1])) if o.visible else (nan, nan)
            arr.objects.append(t)
        self.objects_pub.publish(arr)

        if self.get_parameter("publish_overlay").value and self.overlay_pub.get_subscription_count() > 0:
            over = render_overlay(rgb, label, result.objects, self.get_parameter("overlay_alpha").value,
                                  self._labels)
            msg = image_codec.fill_image_msg_from_pixels(Image(), over, "rgb8", self._out_buffers.get("overlay"))
            self._out_buffers["overlay"] = msg.data
            msg.header = header
            self.overlay_pub.publish(msg)

    def _drop(self, reason: str, message: str) -> None:
        with self._stats_lock:
            self.dropped[reason] += 1
        self._note_error(message)

    def _note_error(self, message: str) -> None:
        self._last_error, self._last_error_time = message, time.monotonic()
        self.get_logger().error(message)

    def _device(self) -> str:
        for part in (self.pipeline.tracker, self.pipeline.refiner, self.pipeline.features):
            dev = getattr(part, "device", None)
            if dev is not None:
                return str(dev)
        return "cpu" if self.config.device == "auto" else self.config.device

    def counters(self) -> Dict[str, Any]:
        """Frame accounting (also in /diagnostics): received == processed + dropped + pending."""
        with self._cond, self._stats_lock:
            return {"received": self.frames_received, "processed": self.frames_processed,
                    "dropped": dict(self.dropped), "pending": len(self._waiting),
                    "in_progress": int(self._busy),
                    "lost_in_transport": max(self.sequence_gaps, self.messages_lost),
                    "sequence_gaps": self.sequence_gaps, "message_lost_events": self.messages_lost,
                    "resets": self.resets,
                    "bad_requests": dict(self.bad_requests)}

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        with self._stats_lock:
            n = max(1, self._stage_frames)
            latency = {k: v / n * 1000.0 for k, v in self._stage_sums.items()}
            window_frames = self._stage_frames
            self._stage_sums.clear()
            self._stage_frames = 0
        elapsed = max(1e-6, now - self._diag_window_start)
        self._diag_window_start = now
        c = self.counters()
        stats = self.pipeline.stats()
        dropped_total = sum(c["dropped"].values())
        recent_error = self._last_error and now - self._last_error_time < 2 * self.get_parameter(
            "diagnostics_period").value + 1.0
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: tracking"
        status.hardware_id = self._device()
        if recent_error:
            status.level, status.message = DiagnosticStatus.WARN, self._last_error[:500]
        elif self._random_weight_parts:
            status.level = DiagnosticStatus.WARN
            status.message = (f"random weights in {', '.join(self._random_weight_parts)}: "
                              "outputs are meaningless (allow_random_weights)")
        elif c["received"] == 0:
            status.level, status.message = DiagnosticStatus.WARN, f"no image received on {self.image_sub.topic_name}"
        else:
            status.level = DiagnosticStatus.OK
            status.message = (f"{stats['objects']} objects, {window_frames / elapsed:.1f} frames/s, "
                              f"{dropped_total} dropped of {c['received']}")
        values = {
            "frames_received": c["received"], "frames_processed": c["processed"],
            "frames_dropped": dropped_total, "frames_pending": c["pending"],
            "messages_lost_in_transport": c["lost_in_transport"],
            "rate_hz": round(window_frames / elapsed, 3), "objects": stats["objects"],
            "object_ids": list(self.pipeline.object_ids), "resets": c["resets"],
            "memory_size": stats["memory_size"], "memory_capacity": stats["memory_capacity"],
            "memory_bytes": stats["memory_bytes"], "device": self._device(),
            "tracker": stats["tracker"], "refiner": stats["refiner"], "features": stats["features"],
            "ablation": stats["ablation"], "refine_mode": stats["refine_mode"],
            "last_error": self._last_error or "",
            "random_weights": ", ".join(self._random_weight_parts) or "none",
        }
        for reason, count in sorted(c["dropped"].items()):
            values[f"dropped.{reason}"] = count
        for source, count in sorted(c["bad_requests"].items()):
            values[f"refused_requests.{source}"] = count
        for stage, ms in sorted(latency.items()):
            values[f"latency_ms.{stage}"] = round(ms, 3)
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [status]
        self.diag_pub.publish(arr)

    # ---------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Stop processing (waiting for a frame in progress); a frame still waiting in the
        buffer, and any arriving later, is counted as dropped."""
        if not getattr(self, "_started", False):  # the constructor failed before the end
            return
        with self._cond:
            self._stop = True
            self._cond.wait_for(lambda: not self._busy, timeout=30)
            if self._waiting:
                with self._stats_lock:
                    self.dropped["shutdown"] += len(self._waiting)
                self._waiting.clear()
            for req in self._requests:
                self._request_failed(req, "node shutting down")
            self._requests.clear()

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()


class _OrderedIntakeGroup(CallbackGroup):
    """Callbacks start one at a time, like a mutually exclusive group, so frames are taken and
    counted in the order they arrived; but a running callback may let the next one start before
    it returns (release()), which the callback that goes on to process its frame does."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._held = False
        self._holder = threading.local()  # rclpy begins, runs and ends a callback in one thread

    def can_execute(self, entity) -> bool:
        with self._lock:
            return not self._held

    def beginning_execution(self, entity) -> bool:
        with self._lock:
            if self._held:
                return False
            self._held = True
        self._holder.holds = True
        return True

    def ending_execution(self, entity) -> None:
        self.release()

    def release(self) -> bool:
        """Let the next callback start; True when this thread held the group."""
        if not getattr(self._holder, "holds", False):
            return False
        self._holder.holds = False
        with self._lock:
            self._held = False
        return True


def _takes_message_info() -> bool:
    """rclpy passes MessageInfo (with publication sequence numbers) to two-argument callbacks
    since Iron; Humble calls every callback with the message alone."""
    from rclpy.subscription import Subscription
    return hasattr(Subscription, "CallbackType")


