"""Smart memory (Eq. 3-7) against hand-computed cases, plus the capacity and pinning rules."""
import numpy as np
import pytest

from hqsmem_ros.core.smart_memory import SmartMemory


def test_hand_computed_sequence():
    m = SmartMemory(capacity=3, lam=1.0, tau=0.9)
    assert m.add(0, [1, 0], pinned=True) is None
    # Only a pinned entry: nothing to score, append.
    assert m.update(5, [1, 0]) is None
    assert m.frames == [0, 5]
    # O(5) = Rel 0.6 * (1 + 1/5) = 0.72; Rel 0.6 < tau -> append.
    assert m.removal_scores(10, [0.6, 0.8]) == pytest.approx({5: 0.72})
    assert m.update(10, [0.6, 0.8]) is None
    assert m.frames == [0, 5, 10]
    # O(5) = 1 * (1 + 1/10) = 1.1, O(10) = 0.6 * (1 + 1/5) = 0.72 -> z_del = 5, Rel 1 >= tau: replace.
    assert m.removal_scores(15, [1, 0]) == pytest.approx({5: 1.1, 10: 0.72})
    assert m.update(15, [1, 0]) == 5
    assert m.frames == [0, 10, 15]
    # O(10) = 0.8 * 1.1 = 0.88, O(15) = 0; Rel(10) = 0.8 < tau says append, but the memory is
    # full: the capacity rule evicts z_del anyway.
    assert m.update(20, [0, 1]) == 10
    assert m.frames == [0, 15, 20]
    assert m.pinned_frames == [0]


def test_append_when_not_relevant_enough():
    m = SmartMemory(capacity=10, lam=0.0, tau=0.95)
    m.add(0, [1, 0, 0])
    m.update(1, [0, 1, 0])
    # Rel to entry 1 is cos(45 deg) = 0.707 < 0.95 -> kept and appended.
    assert m.update(2, [0, 1, 1]) is None
    assert m.frames == [0, 1, 2]


def test_freshness_term_follows_eq5():
    # Two equally relevant entries: O = Rel * (1 + lam / (t - j)), so the one with the larger Fr
    # (the newer one) has the higher removal score and is the one replaced.
    m = SmartMemory(capacity=5, lam=10.0, tau=0.5)
    m.add(0, [0, 1])
    m.update(10, [1, 0])
    m.update(18, [0, -1])  # Rel to 10 is 0 < tau: appended
    m.tau = 0.9
    m._entries[-1].embedding = np.array([1.0, 0.0])  # both unpinned entries now equally relevant
    assert m.update(20, [1, 0]) == 18  # O(18) = 1 + 10/2 > O(10) = 1 + 10/10
    m = SmartMemory(capacity=5, lam=10.0, tau=0.99)
    m.add(0, [0, 1])
    m.update(10, [1, 0])
    m.update(18, [-1, 0])
    scores = m.removal_scores(20, [1, 0])
    assert scores == pytest.approx({10: 1 * (1 + 10 / 10), 18: -1 * (1 + 10 / 2)})


def test_lambda_trades_relevance_for_freshness():
    # Entry 10 is more relevant to z_t, entry 19 is fresher: lam = 0 removes by relevance,
    # a large lam by freshness.
    for lam, expect in ((0.0, 10), (100.0, 19)):
        m = SmartMemory(capacity=3, lam=lam, tau=-1.0)  # tau = -1: always replace
        m.add(0, [0, 1])
        assert m.update(10, [1, 0]) is None  # only a pinned entry so far: append
        m2 = SmartMemory(capacity=4, lam=lam, tau=1.0)  # tau = 1: append unless identical
        m2.add(0, [0, 1])
        m2.update(10, [1, 0])
        m2.update(19, [0.8, 0.6])
        m2.tau = -1.0
        assert m2.update(20, [1, 0]) == expect


def test_capacity_holds_over_10000_updates_and_pins_survive():
    rng = np.random.default_rng(0)
    k = 6
    m = SmartMemory(capacity=k, lam=0.5, tau=0.8)
    m.add(0, rng.normal(size=16), pinned=True)
    m.add(1, rng.normal(size=16), pinned=True)
    sizes = []
    base = rng.normal(size=16)
    for t in range(2, 10_002):
        z = base + 0.7 * rng.normal(size=16)
        removed = m.update(t, z)
        assert removed not in (0, 1)
        assert len(m) <= k
        sizes.append(len(m))
    assert m.pinned_frames == [0, 1]
    assert max(sizes) == k


def test_full_of_pinned_frames():
    m = SmartMemory(capacity=2)
    m.add(0, [1, 0])
    m.add(3, [0, 1])
    assert m.update(5, [1, 1]) == 5  # the candidate itself cannot be stored
    assert m.frames == [0, 3]
    with pytest.raises(ValueError, match="pinned"):
        m.add(7, [1, 1], pinned=True)
    m.unpin(0)
    assert m.update(8, [1, 0]) == 0
    assert m.frames == [3, 8]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="capacity"):
        SmartMemory(capacity=0)
    with pytest.raises(ValueError, match="tau"):
        SmartMemory(capacity=2, tau=1.5)
    with pytest.raises(ValueError, match="lam"):
        SmartMemory(capacity=2, lam=-1)
    m = SmartMemory(capacity=3)
    m.add(4, [1, 0])
    with pytest.raises(ValueError, match="not newer"):
        m.update(4, [1, 0])
    with pytest.raises(ValueError, match="NaN"):
        m.update(5, [np.nan, 0])


def test_zero_embedding_has_no_relevance():
    m = SmartMemory(capacity=4, tau=0.5)
    m.add(0, [1, 0])
    m.update(1, [0, 0])
    assert m.removal_scores(2, [1, 0]) == {1: 0.0}
