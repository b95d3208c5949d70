"""Smart memory (HQ-SMem Sec. 3.2, Eq. 3-7) with a hard capacity and pinned prompt frames.

Each entry is one key frame: its frame index j and an appearance embedding z_j. For a candidate
frame t with embedding z_t:

    Rel(z_j, z_t) = cos(z_j, z_t)                      (Eq. 3)
    Fr(z_j)       = 1 / (t - j)                        (Eq. 4)
    O(z_j)        = Rel * (1 + lam * Fr)               (Eq. 5)
    z_del         = argmax_j O(z_j)                    (Eq. 6)
    replace z_del by z_t if Rel(z_del, z_t) >= tau, else append z_t   (Eq. 7)

Project decisions (../shared/notes/algorithm.md): pinned entries (the user's prompt frames) are
never scored for removal, and when an append would exceed `capacity` the unpinned entry with the
highest O is evicted anyway, so the memory never holds more than `capacity` entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np


@dataclass
class MemoryEntry:
    frame: int
    embedding: np.ndarray  # unit-norm copy (zero vector if the input had no norm)
    pinned: bool


def _unit(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(z)):
        raise ValueError("embedding contains NaN or inf")
    n = float(np.linalg.norm(z))
    return z / n if n > 0 else z.copy()


class SmartMemory:
    """Bounded key-frame memory driven by relevance and freshness."""

    def __init__(self, capacity: int, lam: float = 1.0, tau: float = 0.9):
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if not np.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if not np.isfinite(tau) or not -1.0 <= tau <= 1.0:
            raise ValueError(f"tau must lie in [-1, 1] (a cosine), got {tau!r}")
        self.capacity = int(capacity)
        self.lam = float(lam)
        self.tau = float(tau)
        self._entries: List[MemoryEntry] = []

    # -- inspection ---------------------------------------------------------------------------
    @property
    def frames(self) -> List[int]:
        """Frame indices held now, oldest first."""
        return [e.frame for e in self._entries]

    @property
    def pinned_frames(self) -> List[int]:
        return [e.frame for e in self._entries if e.pinned]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, frame: int) -> bool:
        return any(e.frame == frame for e in self._entries)

    def removal_scores(self, t: int, z) -> dict:
        """O(z_j) (Eq. 5) for every unpinned entry, keyed by frame index."""
        zt = _unit(z)
        return {e.frame: s for e, s in zip(*self._scored(t, zt))}

    # -- updates ------------------------------------------------------------------------------
    def add(self, t: int, z, pinned: bool = True) -> Optional[int]:
        """Store frame t unconditionally (a prompt frame, pinned by default).

        Returns the frame evicted to respect the capacity, or None. Raises if the memory is full
        of pinned frames and t is pinned too: the caller must unpin or raise the capacity.
        """
        t = int(t)
        zt = _unit(z)
        for e in self._entries:
            if e.frame == t:  # re-prompt on a frame already held: refresh it
                e.embedding, e.pinned = zt, e.pinned or pinned
                return None
        self._check_order(t)
        removed = None
        if len(self._entries) >= self.capacity:
            removed = self._evict_for(t, zt)
            if removed is None:
                if not pinned:
                    return t
                raise ValueError(
                    f"smart memory is full of {self.capacity} pinned prompt frames; "
                    "raise memory capacity or remove objects before adding another prompt frame")
        self._entries.append(MemoryEntry(t, zt, bool(pinned)))
        return removed

    def update(self, t: int, z) -> Optional[int]:
        """Apply Eq. 5-7 and the capacity rule for candidate frame t.

        Returns the frame index removed from memory, or None. If every held frame is pinned and
        the memory is full, the candidate itself is not stored and t is returned.
        """
        t = int(t)
        zt = _unit(z)
        self._check_order(t)
        entries, scores = self._scored(t, zt)
        if entries:
            k = int(np.argmax(scores))
            victim = entries[k]
            rel = float(np.dot(victim.embedding, zt))
            if rel >= self.tau or len(self._entries) >= self.capacity:
                self._entries.remove(victim)
                self._entries.append(MemoryEntry(t, zt, False))
                return victim.frame
        elif len(self._entries) >= self.capacity:
            return t
        self._entries.append(MemoryEntry(t, zt, False))
        return None

    def unpin(self, frame: int) -> None:
        for e in self._entries:
            if e.frame == frame:
                e.pinned = False

    def clear(self) -> None:
        self._entries.clear()

    # -- internals ----------------------------------------------------------------------------
    def _check_order(self, t: int) -> None:
        if self._entries and t <= max(e.frame for e in self._entries):
            raise ValueError(
                f"frame {t} is not newer than the newest frame in memory "
                f"({max(e.frame for e in self._entries)}); reset the memory after a time jump")

    def _scored(self, t: int, zt: np.ndarray):
        entries = [e for e in self._entries if not e.pinned]
        if not entries:
            return entries, np.zeros(0)
        emb = np.stack([e.embedding for e in entries])
        rel = emb @ zt
        fresh = 1.0 / (t - np.array([e.frame for e in entries], dtype=np.float64))
        return entries, rel * (1.0 + self.lam * fresh)

    def _evict_for(self, t: int, zt: np.ndarray) -> Optional[int]:
        entries, scores = self._scored(t, zt)
        if not entries:
            return None
        victim = entries[int(np.argmax(scores))]
        self._entries.remove(victim)
        return victim.frame
