"""The node's health: the frame counters, the last error, and /diagnostics (one status per
diagnostics_period: counts, drops by reason, rates, stage latencies, memory, models, device).

A mixin of the tracking node (hqsmem_ros.ros.node._Tracking): it reads the node's session,
pipeline, intake counters and parameters; it changes nothing but the error it notes.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Tuple

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from hqsmem_ros.ros import dds_transport
from hqsmem_ros.stream.accounting import FrameAccount


class Diagnostics:
    """Counters, last error and /diagnostics (mixed into the tracking node)."""

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

