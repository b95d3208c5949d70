"""The stream session both drivers share: ids, resets, requests and accounting, without ROS.

Requests carry real hqsmem_ros/ObjectPrompt messages (rosbags' types, as `hqsmem bag` reads them).
"""
import numpy as np
import pytest

pytest.importorskip("rosbags", reason="rosbags not installed (pip install .[bag])")
from hqsmem_ros.io.bagfiles import make_typestore  # noqa: E402
from hqsmem_ros.core.pipeline import HQSMemPipeline  # noqa: E402
from hqsmem_ros.data.synth import make_sequence  # noqa: E402
from hqsmem_ros.tools.synth_bag import prompt_array_message  # noqa: E402
from hqsmem_ros.stream import Request, SequenceGaps, StreamSession  # noqa: E402

SIZE = (160, 120)
NS = 1_000_000_000


@pytest.fixture(scope="module")
def scene():
    return make_sequence("stream", seed=1, size=SIZE, frames=12, n_objects=2, scenario="translate_scale")


@pytest.fixture(scope="module")
def store():
    return make_typestore()


def _session(**kw):
    log = []
    session = StreamSession(HQSMemPipeline(None), log=lambda level, text: log.append((level, text)), **kw)
    return session, log


def _request(store, label, ids=None, stamp_ns=0):
    """One mono8/mono16 mask prompt per object of `label`; `ids` overrides the prompts' ids."""
    msg = prompt_array_message(store, label.astype(np.uint16), stamp_ns)
    prompts = list(msg.prompts)
    if ids is not None:
        for p, oid in zip(prompts, ids):
            mono8 = (np.frombuffer(p.mask.data, np.uint16).reshape(label.shape) == p.id).astype(np.uint8) * 255
            p.mask = type(p.mask)(header=p.mask.header, height=label.shape[0], width=label.shape[1],
                                  encoding="mono8", is_bigendian=0, step=label.shape[1], data=mono8.ravel())
            p.id = oid
    return Request("test", prompts, [])


def test_a_frame_that_is_dropped_resets_nothing(scene):
    frames, labels = scene
    session, _ = _session(initial_labels=labels[0].astype(np.uint16))
    for k in range(3):
        assert session.step(frames[k], (10 + k) * NS).result is not None
    ids = session.live_ids
    assert len(ids) == 2
    # A 4x4 frame of another size, stamped before the last one: refused before it may reset.
    tiny = session.step(np.zeros((4, 4, 3), np.uint8), 5 * NS)
    assert tiny.result is None and tiny.drop_reason == "bad_frame" and "too small" in tiny.detail
    assert session.account.resets == 0 and session.live_ids == ids
    after = session.step(frames[3], 13 * NS)
    assert [o.id for o in after.result.objects if o.visible] == list(ids)
    assert session.account.snapshot()["dropped"] == {"bad_frame": 1} and session.account.results == 4
    # A good frame of another size does reset (and the retired ids stay used).
    small = session.step(np.ascontiguousarray(frames[4][:60, :80]), 14 * NS)
    assert small.result is not None and session.account.resets == 1
    assert "size changed from 160x120 to 80x60 at frame 4" in session.account.reset_reasons[0]


def test_a_dropped_frame_gives_its_request_back(scene, store):
    frames, labels = scene
    session, _ = _session()
    req = _request(store, labels[0])
    step = session.step(np.zeros((4, 4, 3), np.uint8), NS, req)
    assert step.request_back and not req.done.is_set()
    step = session.step(frames[0], 2 * NS, req)
    assert req.done.is_set() and req.success and req.ids == [1, 2]
    assert step.labels == {1: "object1", 2: "object2"}


def test_fresh_ids_are_the_lowest_never_used(scene, store):
    frames, labels = scene
    session, _ = _session()
    one = labels[0] == 1
    req = _request(store, one.astype(np.uint16), ids=[65535])
    session.step(frames[0], NS, req)
    assert req.success and session.live_ids == (65535,)
    fresh = _request(store, (labels[1] == 2).astype(np.uint16), ids=[0])
    session.step(frames[1], 2 * NS, fresh)
    assert fresh.success and fresh.ids == [1], fresh.message  # not 65536 (refused before)
    session.reset("test")  # 1 and 65535 retired: never given again
    again = _request(store, labels[2], ids=[0, 0])
    session.step(frames[2], 3 * NS, again)
    assert again.success and again.ids == [2, 3]
    # An explicit id later in the same request is not handed out as a fresh one.
    mixed = _request(store, labels[3], ids=[0, 4])
    session.reset("test")
    session.step(frames[3], 4 * NS, mixed)
    assert mixed.success and mixed.ids == [5, 4]


def test_seeds_after_a_reset_get_fresh_ids_that_do_not_collide(scene):
    frames, labels = scene
    seed = np.zeros_like(labels[0], np.uint16)
    seed[labels[0] == 1], seed[labels[0] == 2] = 2, 3  # ids 2 and 3
    session, _ = _session(initial_labels=seed)
    session.step(frames[0], NS)
    assert session.live_ids == (2, 3)
    session.step(frames[1], 0)  # stamps went back: reset, seeded again
    assert session.account.resets == 1
    assert session.live_ids == (1, 4)  # the lowest ids never used, distinct


def test_stamp_going_back_is_dropped_when_resets_are_off(scene, store):
    frames, labels = scene
    session, log = _session(reset_on_stamp_back=False)
    session.step(frames[0], 10 * NS, _request(store, labels[0]))
    req = _request(store, labels[1], ids=[0, 0])
    step = session.step(frames[1], 9 * NS, req)
    assert step.drop_reason == "stamp_backwards" and step.request_back
    assert session.account.resets == 0 and session.live_ids == (1, 2)
    assert any("dropped" in text for level, text in log if level == "error")


def test_refused_requests_are_counted_and_the_frame_goes_on(scene, store):
    frames, labels = scene
    session, _ = _session()
    session.step(frames[0], NS, _request(store, labels[0]))
    bad = Request("svc", [], [7])
    step = session.step(frames[1], 2 * NS, bad)
    assert step.result is not None and bad.done.is_set() and not bad.success
    assert "cannot remove id 7" in bad.message
    assert session.account.snapshot()["refused_requests"] == {"svc": 1}
    assert session.account.frames == session.account.results == 2


def test_sequence_gaps_per_publisher_and_unknown_head():
    gaps = SequenceGaps()
    a, b = b"A" * 16, b"B" * 16
    for pub, seq in [(a, 7), (a, 8), (b, 1), (a, 11), (b, 2), (b, 5), (a, 12)]:
        gaps.see(pub, seq)
    assert gaps.gaps == 2 + 2  # a: 9, 10 missing; b: 3, 4 missing
    assert gaps.unknown_head == 6  # a's 1..6: sent before its first received frame
    gaps.see(None, None)  # the middleware gave no numbers
    assert gaps.gaps == 4 and gaps.unknown_head == 6


def test_a_removed_id_is_never_given_again(scene, store):
    # The session's rule alone: the pipeline would take the id back (test_pipeline.py).
    frames, labels = scene
    session, _ = _session()
    session.step(frames[0], NS, _request(store, labels[0]))
    gone = Request("svc", [], [2])
    session.step(frames[1], 2 * NS, gone)
    assert gone.success and session.live_ids == (1,) == tuple(session.pipeline.tracker.object_ids)
    again = _request(store, (labels[2] == 2).astype(np.uint16), ids=[2])
    step = session.step(frames[2], 3 * NS, again)
    assert step.result is not None and not again.success and "never reused" in again.message
    assert session.live_ids == (1,)
    fresh = _request(store, (labels[3] == 2).astype(np.uint16), ids=[0])
    session.step(frames[3], 4 * NS, fresh)
    assert fresh.success and fresh.ids == [3] and session.live_ids == (1, 3)


def test_a_size_change_is_dropped_when_resets_on_size_are_off(scene):
    # `hqsmem track`'s session: frames without stamps, one size per sequence.
    frames, labels = scene
    session, log = _session(initial_labels=labels[0].astype(np.uint16), reset_on_size_change=False)
    first = session.step(frames[0], None)
    assert first.result is not None and first.result.stamp is None and session.live_ids == (1, 2)
    other = session.step(np.ascontiguousarray(frames[1][:60, :80]), None)
    assert other.result is None and other.drop_reason == "size_changed"
    assert other.detail == "image size changed from 160x120 to 80x60 at frame 1"
    assert session.account.resets == 0 and session.live_ids == (1, 2)
    assert session.step(frames[1], None).result.frame == 1
    assert session.account.snapshot()["dropped"] == {"size_changed": 1}
