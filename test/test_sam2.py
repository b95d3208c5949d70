"""SAM 2.1 streaming tracker against the `sam2` package's own SAM2VideoPredictor.

CPU, SAM 2.1 Hiera-T with seeded random weights at a 128 px input (the config's 1024 is only a
hydra override away); object pointers limited to 6 frames so that short clips reach SAM2's
steady state (the predictor caps pointers at the clip length, a stream does not). The predictor
reads the same frames from a folder of JPEGs; the tracker gets them decoded, one at a time.
"""
import gc
import weakref

import numpy as np
import pytest
import torch
from hydra import compose
from PIL import Image

from hqsmem_ros.core import registry
from hqsmem_ros.core.config import ConfigError
from hqsmem_ros.core.pipeline import HQSMemPipeline, ObjectPrompt
from hqsmem_ros.core.smart_memory import SmartMemory
from hqsmem_ros.models.checkpoints import CheckpointError
from hqsmem_ros.models.sam2_tracker import MODELS, SAM2Tracker, _Row, build_model

# The predictor warns on every frame that SAM2's optional CUDA kernel (hole filling) is missing.
pytestmark = pytest.mark.filterwarnings("ignore:cannot import name '_C':UserWarning")

H, W = 72, 96
SIZE = 128
SHORT_PTRS = ["++model.max_obj_ptrs_in_encoder=6"]


pytestmark = [pytestmark, pytest.mark.usefixtures("torch_one_thread")]  # conftest.py


@pytest.fixture(scope="module")
def net():
    return build_model("tiny", image_size=SIZE, seed=0, overrides=SHORT_PTRS)


def scene(n_frames, seed=0):
    """Two coloured blocks moving over a noisy gradient; frames and label maps."""
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for t in range(n_frames):
        img = np.zeros((H, W, 3), np.int64)
        img[..., 0] = np.linspace(0, 200, W)[None].astype(np.int64)
        img[..., 2] = 60
        img += rng.integers(0, 30, img.shape)
        lab = np.zeros((H, W), np.uint8)
        img[10:40, 10 + t:40 + t] = (220, 40, 40)
        lab[10:40, 10 + t:40 + t] = 1
        img[40:64, 60 - t:84 - t] = (30, 200, 90)
        lab[40:64, 60 - t:84 - t] = 2
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(lab)
    return frames, labels


def jpeg_clip(tmp_path, frames):
    """The frames as the predictor's JPEG folder, and the same JPEGs decoded for the stream."""
    folder = tmp_path / "jpg"
    folder.mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{t:05d}.jpg", quality=95)
    decoded = [np.array(Image.open(folder / f"{t:05d}.jpg").convert("RGB")) for t in range(len(frames))]
    return str(folder), decoded


def run_predictor(net, folder, prompt_masks):
    """SAM2VideoPredictor on the folder: {frame: {id: (mask, low-res logits)}}."""
    out = {}
    with torch.inference_mode():
        state = net.init_state(folder)
        for oid, m in prompt_masks.items():
            net.add_new_mask(state, 0, oid, m)
        for f, ids, video_masks in net.propagate_in_video(state):
            out[f] = {}
            for k, oid in enumerate(ids):
                per_obj = state["output_dict_per_obj"][k]
                stored = per_obj["cond_frame_outputs"].get(f) or per_obj["non_cond_frame_outputs"][f]
                out[f][oid] = ((video_masks[k, 0] > 0).numpy(), stored["pred_masks"].clone())
    return out


def run_stream(tracker, frames, prompts, remove=None, store_every=None, commit_masks=None):
    """Drive the tracker like the pipeline does: {frame: {id: (mask, logits)}}."""
    remove = remove or {}
    out = {}
    for t, img in enumerate(frames):
        masks = tracker.track(t, img) if tracker.object_ids else {}
        logits = {k: v.clone() for k, v in tracker.logits().items()}
        if t in remove:
            tracker.remove_objects(remove[t])
            for oid in remove[t]:
                masks.pop(oid, None)
        if t in prompts:
            shown = tracker.add_objects(t, img, prompts[t])
            masks.update(shown)
            logits.update({k: v.clone() for k, v in tracker.logits().items() if k in prompts[t]})
        committed = commit_masks(t, masks) if commit_masks else masks
        tracker.commit(t, img, committed)
        if store_every and t % store_every == 0:
            tracker.store_memory(t)
        out[t] = {oid: (masks[oid], logits[oid]) for oid in masks}
    return out


def streaming(net, **kw):
    return SAM2Tracker(net, "sam2.1_hiera_tiny", torch.device("cpu"), **kw)


# -- equivalence with SAM2's own video predictor ----------------------------------------------

def test_streaming_reproduces_the_video_predictor_exactly(net, tmp_path):
    frames, labels = scene(11)
    folder, decoded = jpeg_clip(tmp_path, frames)
    prompt = {1: labels[0] == 1}
    ref = run_predictor(net, folder, prompt)
    tracker = streaming(net, memory_rule="sam2")
    got = run_stream(tracker, decoded, {0: prompt})
    assert sorted(got) == sorted(ref) == list(range(11))
    for t in range(11):
        ref_mask, ref_logits = ref[t][1]
        mask, logits = got[t][1]
        assert torch.equal(logits, ref_logits), f"frame {t}: logits differ by {(logits - ref_logits).abs().max()}"
        assert np.array_equal(mask, ref_mask), f"frame {t}"
    # Non-trivial output: the masks neither vanish nor fill the frame, and change over time.
    areas = [got[t][1][0].sum() for t in range(11)]
    assert all(0 < a < H * W for a in areas) and len(set(areas)) > 5
    # Streaming state stays bounded: SAM2's 6 recent frames, the prompt frame in long-term memory.
    assert tracker.recent_memory_frames() == list(range(5, 11))
    assert tracker.memory_frames() == [0]


def test_the_memory_choice_is_what_makes_the_match(net, tmp_path):
    """Reading only the prompt and the previous frame (the 'pipeline' rule with nothing stored)
    agrees with SAM2 while SAM2 also has only those, and differs as soon as SAM2 reads more."""
    frames, labels = scene(6)  # at least 6 frames: the predictor caps pointers at the clip length
    folder, decoded = jpeg_clip(tmp_path, frames)
    prompt = {1: labels[0] == 1}
    ref = run_predictor(net, folder, prompt)
    got = run_stream(streaming(net, memory_rule="pipeline", recent_frames=1), decoded, {0: prompt})
    for t in (0, 1, 2):
        assert torch.equal(got[t][1][1], ref[t][1][1])
    for t in (3, 4, 5):
        assert not torch.allclose(got[t][1][1], ref[t][1][1], atol=1e-5)


def test_memory_stride_follows_sam2(net, tmp_path):
    frames, labels = scene(9, seed=3)
    folder, decoded = jpeg_clip(tmp_path, frames)
    prompt = {2: labels[0] == 2}
    net.memory_temporal_stride_for_eval = 2
    try:
        ref = run_predictor(net, folder, prompt)
        tracker = streaming(net, memory_rule="sam2")
        assert tracker.memory_stride == 2
        got = run_stream(tracker, decoded, {0: prompt})
    finally:
        net.memory_temporal_stride_for_eval = 1
    for t in range(9):
        assert torch.equal(got[t][2][1], ref[t][2][1]), f"frame {t}"
    # Kept: the last frame and the even frames SAM2 can still read (t-2 back to t-10, stride 2).
    assert tracker.recent_memory_frames() == [0, 2, 4, 6, 8]


def test_objects_run_batched_and_match_the_predictor(net, tmp_path):
    frames, labels = scene(8, seed=1)
    folder, decoded = jpeg_clip(tmp_path, frames)
    prompt = {1: labels[0] == 1, 2: labels[0] == 2}
    ref = run_predictor(net, folder, prompt)
    tracker = streaming(net, memory_rule="sam2")
    got = run_stream(tracker, decoded, {0: prompt})
    assert tracker.last_batches == [[1, 2]]  # one forward pass for both objects
    for t in range(8):
        for oid in (1, 2):
            # One batched pass instead of the predictor's one-object passes: float rounding only.
            torch.testing.assert_close(got[t][oid][1], ref[t][oid][1], atol=1e-5, rtol=0)
            assert np.array_equal(got[t][oid][0], ref[t][oid][0]), f"frame {t} object {oid}"


# -- objects coming and going -----------------------------------------------------------------

@pytest.mark.parametrize("mixed", [False, True])
def test_adding_and_removing_an_object_leaves_the_other_untouched(net, mixed):
    frames, labels = scene(15, seed=2)
    alone = streaming(net, memory_rule="sam2")
    solo = run_stream(alone, frames, {0: {1: labels[0] == 1}})
    both = streaming(net, memory_rule="sam2", batch_mixed_layouts=mixed)
    batches = []
    joined = {}
    for t, img in enumerate(frames):
        masks = both.track(t, img) if both.object_ids else {}
        batches.append(list(both.last_batches))
        if t == 12:
            both.remove_objects([2])
            masks.pop(2)
        if t == 0:
            masks.update(both.add_objects(0, img, {1: labels[0] == 1}))
        if t == 3:
            masks.update(both.add_objects(3, img, {2: labels[3] == 2}))
        logits = both.logits()
        both.commit(t, img, masks)
        joined[t] = (masks[1], logits[1].clone())
        if t > 0:
            torch.testing.assert_close(joined[t][1], solo[t][1][1], atol=1e-5, rtol=0)
            assert np.array_equal(joined[t][0], solo[t][1][0]), f"frame {t}"
    # Object 2's memory had fewer frames than object 1's until it had SAM2's full layout: in
    # separate passes, or (mixed) in one pass with its missing memory masked out.
    assert batches[4] == ([[1, 2]] if mixed else [[1], [2]])
    assert batches[11] == [[1, 2]]
    assert batches[14] == [[1]]
    # Removing it freed everything it had: the same bytes as the run that never had it.
    assert both.memory_bytes() == alone.memory_bytes()
    assert both.object_ids == [1]


def test_objects_with_different_memory_in_one_masked_pass_equal_separate_passes(net):
    # Smart-memory rule, objects prompted on different frames, frames stored in long-term
    # memory: each object reads a different number of memory frames, for the whole stream.
    frames, labels = scene(14, seed=4)
    prompts = {0: {1: labels[0] == 1}, 5: {2: labels[5] == 2}}
    runs = {}
    for mixed in (False, True):
        tracker = streaming(net, memory_rule="pipeline", batch_mixed_layouts=mixed)
        batches = []

        def note(t, masks, tracker=tracker, batches=batches):
            batches.append(list(tracker.last_batches))
            return masks
        runs[mixed] = (run_stream(tracker, frames, prompts, store_every=3, commit_masks=note), batches)
    (separate, sep_batches), (joined, mixed_batches) = runs[False], runs[True]
    assert [1] in sep_batches[-1] and [2] in sep_batches[-1]  # the layouts really differ
    assert mixed_batches[-1] == [[1, 2]]
    for t in range(14):
        assert sorted(joined[t]) == sorted(separate[t])
        for oid in joined[t]:
            # float rounding only (measured: 7e-7), the same masks
            torch.testing.assert_close(joined[t][oid][1], separate[t][oid][1], atol=1e-5, rtol=0)
            assert np.array_equal(joined[t][oid][0], separate[t][oid][0]), f"frame {t} object {oid}"


def test_teacher_forcing_writes_the_committed_mask(net, tmp_path):
    """A refined mask replaces the prediction in memory, encoded like SAM2 encodes a mask
    prompt; committing the prediction itself keeps SAM2's own memory."""
    side = SIZE  # frames at SAM2's input size: the mask needs no resize
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(2)]
    folder = tmp_path / "jpg"
    folder.mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{t:05d}.jpg", quality=95)
    decoded = [np.array(Image.open(folder / f"{t:05d}.jpg").convert("RGB")) for t in range(2)]
    prompt = np.zeros((side, side), bool)
    prompt[20:70, 30:90] = True
    refined = np.zeros((side, side), bool)
    refined[40:100, 10:60] = True

    def first_two(commit_masks=None):
        tr = streaming(net)
        tr.add_objects(0, decoded[0], {7: prompt})
        tr.commit(0, decoded[0], {7: prompt})
        pred = tr.track(1, decoded[1])
        tr.commit(1, decoded[1], commit_masks(pred) if commit_masks else pred)
        return tr, pred

    own, pred = first_two()
    same, _ = first_two(lambda p: {7: p[7].copy()})
    forced, _ = first_two(lambda p: {7: refined})
    assert not np.array_equal(pred[7], refined)
    assert torch.equal(own._recent[1].rows[7].feat, same._recent[1].rows[7].feat)
    got = forced._recent[1].rows[7].feat
    # SAM2's memory encoder on the binarised refined mask, from SAM2's own frame loader.
    from sam2.utils.misc import load_video_frames
    with torch.inference_mode():
        images, _, _ = load_video_frames(str(folder), side, offload_video_to_cpu=True,
                                         compute_device=torch.device("cpu"))
        _, feats, _, sizes = net._prepare_backbone_features(net.forward_image(images[1:2]))
        want, _ = net._encode_new_memory(feats, sizes, torch.from_numpy(refined)[None, None].float() * 2 - 1,
                                         torch.tensor([[10.0]]), is_mask_from_pts=True)
    assert torch.equal(got, want.to(torch.bfloat16))
    assert not torch.equal(got, own._recent[1].rows[7].feat)
    # ... and what the next frame reads changes with it.
    own.track(2, decoded[1])
    forced.track(2, decoded[1])
    assert not torch.allclose(own.logits()[7], forced.logits()[7], atol=1e-4)


def test_errors_are_clear(net):
    frames, labels = scene(3)
    tr = streaming(net)
    with pytest.raises(ValueError, match="mask of object 1 is empty"):
        tr.add_objects(0, frames[0], {1: np.zeros((H, W), bool)})
    with pytest.raises(ValueError, match="mask of object 1 is"):
        tr.add_objects(0, frames[0], {1: np.ones((5, 5), bool)})
    tr.add_objects(0, frames[0], {1: labels[0] == 1})
    tr.commit(0, frames[0], {1: labels[0] == 1})
    with pytest.raises(ValueError, match="without track"):
        tr.commit(1, frames[1], {})
    with pytest.raises(ValueError, match="unknown object"):
        tr.commit(1, frames[1], {9: labels[1] == 1})
    with pytest.raises(ValueError, match="image size changed"):
        tr.track(1, frames[1][:40])
    with pytest.raises(ValueError, match="not after the last committed frame"):
        tr.track(0, frames[0])
    with pytest.raises(ValueError, match="not the last committed frame"):
        tr.store_memory(5)


# -- bounded memory ---------------------------------------------------------------------------

def test_memory_stays_within_capacity_over_2000_frames(net):
    """The bank bookkeeping that commit runs (`_record`), fed 2,000 frames of real memory rows
    under the pipeline's smart-memory calls. A full SAM2 step costs ~0.15 s on this CPU, so the
    network itself runs for the first frames and the last ones only."""
    capacity, interval = 4, 2
    frames, labels = scene(4)
    tr = streaming(net, memory_rule="pipeline", recent_frames=2)
    smart = SmartMemory(capacity, lam=1.0, tau=0.9)
    rng = np.random.default_rng(0)
    tr.add_objects(0, frames[0], {1: labels[0] == 1, 2: labels[0] == 2})
    tr.commit(0, frames[0], {1: labels[0] == 1, 2: labels[0] == 2})
    smart.add(0, rng.normal(size=8), pinned=True)
    tr.store_memory(0)
    for t in (1, 2):
        tr.commit(t, frames[t], tr.track(t, frames[t]))
    template = tr._recent[2].rows
    sizes, byte_counts, dropped = [], [], []
    for t in range(3, 2003):
        tr._record(t, {oid: _Row(r.feat.clone(), r.ptr.clone(), False) for oid, r in template.items()})
        if t % interval == 0:  # the pipeline's candidate frames, as HQSMemPipeline._update_memory does
            removed = smart.update(t, rng.normal(size=8))
            if removed is not None and removed != t:
                probe = weakref.ref((tr._bank.get(removed) or tr._recent.get(removed)).rows[1].feat)
                tr.drop_memory(removed)
                dropped.append((removed, probe))
            if t in smart:
                tr.store_memory(t)
        assert tr.memory_frames() == smart.frames == sorted(smart.frames)
        sizes.append(len(tr.memory_frames()))
        byte_counts.append(tr.memory_bytes())
        lay = tr._layout(1, t + 1)
        assert len(lay.cond) + len(lay.spatial) <= capacity + 2  # long-term + 2 recent frames
    assert max(sizes) == capacity
    assert len(set(byte_counts[100:])) == 1  # constant once the bank is full
    gc.collect()
    # Rows of dropped frames are freed once they have also left the recent frames.
    assert len(dropped) > 900
    assert all(ref() is None for f, ref in dropped if f < 2000)
    # The network still runs on the state left after 2,000 frames.
    for t in (2003, 2004):
        out = tr.track(t, frames[3])
        assert sorted(out) == [1, 2]
        tr.commit(t, frames[3], out)


def test_pipeline_with_smart_memory_keeps_memory_constant():
    cfg = {
        "ablation": "full", "device": "cpu", "process_max_side": None,
        "tracker": {"type": "sam2", "model": "tiny", "random_weights": True, "image_size": SIZE},
        "refiner": {"type": "color"}, "features": {"type": "histogram"},
        "memory_capacity": 3, "memory_interval": 2,
    }
    pipe = HQSMemPipeline(cfg)
    assert isinstance(pipe.tracker, SAM2Tracker) and pipe.tracker.effective_memory_rule == "pipeline"
    frames, labels = scene(22)
    bytes_at = {}
    for t, img in enumerate(frames):
        prompts, remove = [], []
        if t == 0:
            prompts = [ObjectPrompt(1, mask=labels[0] == 1)]
        if t == 6:
            prompts = [ObjectPrompt(2, mask=labels[6] == 2)]
        if t == 14:
            remove = [2]
        res = pipe.process(img, prompts=prompts, remove=remove)
        assert len(res.memory_frames) <= 3
        assert sorted(res.masks) == ([1, 2] if 6 <= t < 14 else [1])
        if 6 <= t < 14:
            assert {0, 6} <= set(res.memory_frames)  # both prompt frames pinned
        bytes_at[t] = pipe.tracker.memory_bytes()
    assert 0 in pipe.stats()["memory_frames"]
    # Constant after the removal: a candidate frame (even) is in long-term memory already, the
    # frame after it is one more (the recent frame), and nothing accumulates.
    assert bytes_at[16] == bytes_at[18] == bytes_at[20]
    assert bytes_at[17] == bytes_at[19] == bytes_at[21]
    assert max(bytes_at[t] for t in range(16, 22)) < max(bytes_at[t] for t in range(6, 14))


def test_set_memory_policy_switches_auto_rule(net):
    tr = streaming(net)
    assert tr.effective_memory_rule == "pipeline"
    tr.set_memory_policy(False, 8)
    assert tr.effective_memory_rule == "sam2"
    tr.set_memory_policy(True, 8)
    assert tr.effective_memory_rule == "pipeline"


# -- configuration ----------------------------------------------------------------------------

def test_config_is_validated():
    base = {"type": "sam2", "model": "tiny", "image_size": SIZE}
    with pytest.raises(ConfigError, match="no checkpoint"):
        registry.build("tracker", base, "cpu")
    for bad, msg in (({"model": "huge"}, "model must be one of sam2.1_hiera_tiny"), ({"image_size": 100}, "multiple of 32"),
                     ({"memory_rule": "fifo"}, "memory_rule"), ({"num_maskmem": 3}, "not used"),
                     ({"recent_frames": 0}, "recent_frames"), ({"colour": 1}, "unknown parameter")):
        with pytest.raises(ConfigError, match=msg):
            registry.build("tracker", {**base, "random_weights": True, **bad}, "cpu")
    with pytest.raises(ConfigError, match="either checkpoint or random_weights"):
        registry.build("tracker", {**base, "random_weights": True, "checkpoint": "x.pt"}, "cpu")


def test_all_four_sam2_1_configs_resolve():
    dims = {}
    for name, (config_file, _, _) in MODELS.items():
        cfg = compose(config_name=config_file)
        dims[name] = int(cfg.model.image_encoder.trunk.embed_dim)
    assert dims == {"sam2.1_hiera_tiny": 96, "sam2.1_hiera_small": 96,
                    "sam2.1_hiera_base_plus": 112, "sam2.1_hiera_large": 144}


def test_checkpoint_loading(net, tmp_path):
    donor = net  # seed 0; the tracker below starts from seed 3, so only loading makes them equal
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": donor.state_dict()}, path)  # the official files' layout
    tr = registry.build("tracker", {"type": "sam2", "model": "tiny", "image_size": SIZE, "seed": 3,
                                    "checkpoint": str(path)}, "cpu")
    for key, value in donor.state_dict().items():
        assert torch.equal(tr.net.state_dict()[key], value), key
    partial = {k: v for k, v in donor.state_dict().items() if not k.startswith("memory_encoder.")}
    torch.save({"model": partial}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt.*missing keys"):
        registry.build("tracker", {"type": "sam2", "model": "tiny", "image_size": SIZE,
                                   "checkpoint": str(tmp_path / "partial.pt")}, "cpu")


def test_bench_runs_with_random_weights(tmp_path):
    from hqsmem_ros.tools.bench import run_bench
    config = tmp_path / "sam2.yaml"
    config.write_text(
        "device: cpu\nprocess_max_side: null\n"
        f"tracker: {{type: sam2, model: tiny, image_size: {SIZE}}}\n"
        "refiner: {type: color}\nfeatures: {type: histogram}\n")
    report = run_bench(size=(64, 64), objects=2, frames=3, config=str(config), one_core=False,
                       random_weights=True)
    assert report["config"]["tracker"]["random_weights"] is True
    assert report["full"]["stats"]["tracker"] == "sam2"
    assert report["fps"] > 0 and report["base_fps"] > 0


# -- the long-stream benchmark (hqsmem_ros.tools.bench_sam2) ----------------------------------

def test_bench_predictor_state_grows_with_the_stream_and_the_trackers_does_not():
    import argparse
    from hqsmem_ros.tools.bench_sam2 import build_pipeline, run_ours, run_predictor, synthetic_stream
    frames, label0 = synthetic_stream(1, (96, 64), cycle=6)
    net = build_model("tiny", image_size=64, seed=0, overrides=SHORT_PTRS)
    pred = run_predictor(net, frames, label0, n_frames=30, every=10, device=torch.device("cpu"), amp_dtype=None)
    assert [r["frame"] for r in pred] == [10, 20, 30]
    growth = [b["state_mb"] - a["state_mb"] for a, b in zip(pred, pred[1:])]
    assert all(g > 0 for g in growth)  # the predictor keeps every frame's outputs
    args = argparse.Namespace(model="tiny", seed=0, checkpoint=None, image_size=64, device="cpu",
                              precision="fp32", capacity=4, interval=3, features="histogram")
    pipe = build_pipeline(args, 1)
    ours = run_ours(pipe, frames, label0, n_frames=30, every=10, device=torch.device("cpu"))
    assert ours[1]["state_mb"] == ours[2]["state_mb"] > 0  # bounded: nothing grows once memory is full
    assert all(r["memory_frames"] <= 4 for r in ours)
