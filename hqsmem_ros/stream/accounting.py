"""What happened to a stream's frames, and where their time went (ROS-free, thread-safe).

FrameAccount: frames given to a session = results + drops counted by reason; refused requests
by source; tracker resets with their reasons. StageTimes: seconds per stage summed over frames.
SequenceGaps: frames missing from publishers' sequence numbers (lost before they reached us).
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple


@dataclass
class FrameAccount:
    """frames == results + sum(dropped.values()), at every moment."""
    results: int = 0
    dropped: Counter = field(default_factory=Counter)
    refused_requests: Counter = field(default_factory=Counter)
    resets: int = 0
    reset_reasons: List[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def frames(self) -> int:
        return self.results + sum(self.dropped.values())

    def drop(self, reason: str, count: int = 1) -> None:
        with self.lock:
            self.dropped[reason] += count

    def result(self) -> None:
        with self.lock:
            self.results += 1

    def refused(self, source: str) -> None:
        with self.lock:
            self.refused_requests[source] += 1

    def reset(self, why: str) -> None:
        with self.lock:
            self.resets += 1
            self.reset_reasons.append(why)

    def snapshot(self) -> Dict[str, object]:
        with self.lock:
            return {"results": self.results, "dropped": dict(self.dropped), "resets": self.resets,
                    "refused_requests": dict(self.refused_requests)}


class StageTimes:
    """Seconds per stage (the pipeline's stages plus the driver's: decode, publish, ...) summed
    over the frames of a window; take() returns the means in milliseconds and starts a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: Counter = Counter()
        self._frames = 0
        self._all: Counter = Counter()
        self._all_frames = 0

    def add(self, stages: Mapping[str, float]) -> None:
        """One frame's seconds per stage."""
        with self._lock:
            for stage, seconds in stages.items():
                self._sums[stage] += seconds
                self._all[stage] += seconds
            self._frames += 1
            self._all_frames += 1

    def take(self) -> Tuple[Dict[str, float], int]:
        """(mean milliseconds per stage, frames) of the window since the last take()."""
        with self._lock:
            n = max(1, self._frames)
            means = {k: v / n * 1000.0 for k, v in self._sums.items()}
            frames = self._frames
            self._sums.clear()
            self._frames = 0
        return means, frames

    def mean_ms_all(self) -> Dict[str, float]:
        """Mean milliseconds per stage over every frame so far (take() does not reset this)."""
        with self._lock:
            n = max(1, self._all_frames)
            return {k: v / n * 1000.0 for k, v in self._all.items()}


class SequenceGaps:
    """Frames missing from each publisher's sequence numbers (1, 2, 3, ... per publisher).

    gaps: numbers skipped between two received frames: lost in transport for sure.
    unknown_head: numbers before a publisher's first received frame. They cannot be told apart
    from frames sent before the subscription matched (a camera started earlier), so they are
    reported as unknown, not as lost. Frames lost after the last received one cannot be seen by
    a subscriber at all (only the publisher knows how many it sent): no count can include them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Dict[bytes, int] = {}
        self.gaps = 0
        self.unknown_head = 0
        self.paused_gaps = 0  # numbers skipped while the subscription did not exist (pause())
        self._paused: set = set()

    def see(self, publisher: Optional[bytes], seq: Optional[int]) -> None:
        if not seq or not publisher:  # the middleware does not fill them in
            return
        with self._lock:
            last = self._last.get(publisher)
            if last is None:
                self.unknown_head += seq - 1
            elif seq > last + 1:
                if publisher in self._paused:
                    self.paused_gaps += seq - last - 1
                else:
                    self.gaps += seq - last - 1
            self._paused.discard(publisher)
            # seq <= last: a restarted publisher (same id is unlikely): it starts over
            self._last[publisher] = seq

    def pause(self) -> None:
        """The subscription goes away (a lifecycle deactivate): the numbers each known publisher
        skips before its next received frame were sent while nobody listened, not lost."""
        with self._lock:
            self._paused = set(self._last)
