"""DeAOT wrapper against the official engine (deaotpy), on CPU with random weights at 48x64.

The plain engine is driven exactly like the official evaluator: reference frame, then per frame
match_propogate_one_frame / decode_current_logits / softmax-argmax / update_memory, with the
engine's own fixed-gap long-term memory rule; inputs go through the official transforms.
"""
import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms

import aot.dataloaders.video_transforms as official_tf
from aot.networks.engines import build_engine
from aot.utils.image import one_hot_mask

from hqsmem_ros.core import registry
from hqsmem_ros.core.config import ConfigError, load_config
from hqsmem_ros.core.pipeline import HQSMemPipeline, ObjectPrompt
from hqsmem_ros.models.checkpoints import CheckpointError, sha256_of_file
from hqsmem_ros.models.deaot import DeAOTTracker, build_model

H, W = 48, 64
GAP = 3


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest.py


@pytest.fixture(scope="module")
def r50():
    """R50-DeAOT-L with seeded random weights whose masks depend on the labels.

    Untrained, DeAOT hardly reads its ID branch (the ID bank starts at gain 1/256, so every
    token gets the same identity, and the decoder follows the encoder shortcuts); the
    comparisons below would then pass whatever the labels were. Seeded random values that
    make the ID path count fix that.
    """
    net, cfg = build_model("r50_deaotl", seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bank = net.patch_wise_id_bank.weight
        bank.copy_(torch.randn(bank.shape, generator=gen) * 0.05)
        for adapter in (net.decoder.adapter_16x, net.decoder.adapter_8x, net.decoder.adapter_4x):
            adapter.weight.mul_(0.2)
        net.decoder.conv_in.conv.weight[:, :256].mul_(0.2)  # the visual half of the LSTT output
    return net, cfg


def make_tracker(r50, **kw):
    net, cfg = r50
    return DeAOTTracker(net, cfg, "r50_deaotl", torch.device("cpu"), **kw)


def scene(n_frames, n_objects=2, seed=0):
    """Coloured blocks drifting over a gradient with noise, and their frame-0 label."""
    rng = np.random.default_rng(seed)
    label0 = np.zeros((H, W), np.uint8)
    if n_objects <= 2:
        boxes = [(8, 28, 5, 25), (20, 44, 34, 58)][:n_objects]
    else:  # a grid of small blocks
        boxes = [(2 + 11 * (k // 6), 10 + 11 * (k // 6), 2 + 10 * (k % 6), 9 + 10 * (k % 6)) for k in range(n_objects)]
    colours = rng.integers(30, 255, (n_objects, 3))
    frames = []
    for t in range(n_frames):
        img = np.zeros((H, W, 3), np.int64)
        img[..., 0] = np.linspace(0, 200, W)[None].astype(np.int64)
        img[..., 2] = 60
        for k, (y0, y1, x0, x1) in enumerate(boxes):
            d = t if k % 2 == 0 else -t
            img[max(0, y0):y1, max(0, x0 + d):max(0, x1 + d)] = colours[k]
            if t == 0:
                label0[y0:y1, x0:x1] = k + 1
        img += rng.integers(-20, 21, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames, label0


def to_label(masks):
    lab = np.zeros((H, W), np.uint8)
    for oid, m in masks.items():
        lab[m] = oid
    return lab


def to_masks(label, ids):
    return {i: label == i for i in ids}


def run_plain(net, frames, prompts, gap, forced=None, max_len=9999):
    """The official evaluation loop; returns each tracked frame's label (before prompts merge)."""
    forced = forced or {}
    engine = build_engine("deaotengine", phase="eval", aot_model=net, gpu_id=0, long_term_mem_gap=gap,
                          short_term_mem_skip=1, max_len_long_term=max_len)
    engine.eval()
    tf = transforms.Compose([official_tf.MultiRestrictSize(None, 800 * 1.3, False, [1], True),
                             official_tf.MultiToTensor()])
    out = []
    with torch.no_grad():
        for t, frame in enumerate(frames):
            sample = {"current_img": frame.astype(np.float32), "meta": {}}
            img = tf(sample)[0]["current_img"].unsqueeze(0).float()
            if t == 0:
                lab = torch.from_numpy(prompts[0]).float()[None, None]
                engine.add_reference_frame(img, F.interpolate(lab, size=img.shape[2:], mode="nearest"),
                                           frame_step=0, obj_nums=int(prompts[0].max()))
                continue
            engine.match_propogate_one_frame(img)
            logit = engine.decode_current_logits((H, W))
            pred = torch.argmax(torch.softmax(logit, dim=1), dim=1, keepdim=True).float()
            out.append(pred[0, 0].numpy().astype(np.uint8))
            if t in forced:
                pred = torch.from_numpy(forced[t](out[-1])).float()[None, None]
            if t in prompts:  # a new object mid-video, as the official evaluator adds it
                new = torch.from_numpy(prompts[t]).float()[None, None]
                keep = (new == 0).float()
                pred = pred * keep + new * (1 - keep)
                pred = F.interpolate(pred, size=engine.input_size_2d, mode="nearest")
                engine.add_reference_frame(img, pred, obj_nums=[int(pred.max())], frame_step=t)
                engine.decode_current_logits((H, W))
                engine.update_memory(pred)
            else:
                engine.update_memory(F.interpolate(pred, size=engine.input_size_2d, mode="nearest"))
    return out, engine


def run_wrapper(tracker, frames, prompts, gap, forced=None, max_len=None):
    """The pipeline's calls with the engine's own schedule: store every `gap` frames after the
    last reference frame; with `max_len`, drop the oldest frame first like the engine would."""
    forced = forced or {}
    out, last = [], None
    for t, frame in enumerate(frames):
        masks = tracker.track(t, frame)
        if t > 0:
            out.append(to_label(masks))
        committed = dict(masks)
        if t in forced:
            committed = to_masks(forced[t](out[-1]), tracker.object_ids)
        if t in prompts:
            new = {int(i): prompts[t] == i for i in np.unique(prompts[t]) if i}
            tracker.add_objects(t, frame, new)
            committed.update(new)
        tracker.commit(t, frame, committed)
        if t in prompts or t - last >= gap:
            if max_len is not None and len(tracker.memory_frames()) >= max_len:
                tracker.drop_memory(tracker.memory_frames()[0])
            tracker.store_memory(t)
            last = t
    return out


def long_term(tracker, bank=0):
    return tracker._groups[bank].engine.long_term_memories


def test_equals_plain_engine_with_gap_memory_teacher_forcing_and_new_object(r50):
    frames, label0 = scene(9)
    mid = np.zeros((H, W), np.uint8)
    mid[36:46, 2:14] = 3  # a third object prompted on frame 5

    def refine(lab):  # stands in for an accepted HQ mask: object 1 grown by 3 px to the right
        lab = lab.copy()
        ys, xs = np.nonzero(lab == 1)
        lab[ys, np.minimum(xs + 3, W - 1)] = 1
        return lab

    forced = {2: refine, 6: refine}
    prompts = {0: label0, 5: mid}
    plain, engine = run_plain(r50[0], frames, prompts, GAP, forced)
    tracker = make_tracker(r50)
    mine = run_wrapper(tracker, frames, prompts, GAP, forced)
    for t, (a, b) in enumerate(zip(plain, mine), start=1):
        assert np.array_equal(a, b), f"frame {t}: {int((a != b).sum())} pixels differ"
    # The comparison is not vacuous: every object is found, and teacher forcing changed the run.
    assert all(any((lab == i).any() for lab in mine) for i in (1, 2, 3))
    free_run = run_wrapper(make_tracker(r50), frames, prompts, GAP)
    assert any(not np.array_equal(a, b) for a, b in zip(free_run, mine))
    # Same frames held, same tensors, same order.
    assert tracker.memory_frames() == [0, 3, 5, 8]
    for ours, theirs in zip(long_term(tracker), engine.aot_engines[0].long_term_memories):
        for a, b in zip(ours, theirs):
            assert (a is None and b is None) or torch.equal(a, b)


def test_equals_plain_engine_beyond_one_id_bank(r50):
    frames, label0 = scene(3, n_objects=12)
    plain, engine = run_plain(r50[0], frames, {0: label0}, 2)
    assert len(engine.aot_engines) == 2
    tracker = make_tracker(r50, max_objects=20)
    mine = run_wrapper(tracker, frames, {0: label0}, 2)
    for t, (a, b) in enumerate(zip(plain, mine), start=1):
        assert np.array_equal(a, b), f"frame {t}: {int((a != b).sum())} pixels differ"
    assert len(set(np.unique(np.concatenate(mine))) & set(range(11, 13))) > 0  # second bank's ids appear


def test_pipeline_base_row_equals_plain_engine_and_full_row_bounds_memory(r50):
    frames, label0 = scene(9)
    prompts = [ObjectPrompt(id=1, mask=label0 == 1), ObjectPrompt(id=2, mask=label0 == 2)]
    plain, _ = run_plain(r50[0], frames, {0: label0}, GAP)
    base = HQSMemPipeline(load_config({"ablation": "base", "memory_interval": GAP, "device": "cpu"}),
                          tracker=make_tracker(r50))
    for t, frame in enumerate(frames):
        res = base.process(frame, prompts=prompts if t == 0 else None)
        if t > 0:
            assert np.array_equal(res.label_map(), plain[t - 1]), f"frame {t}"
    assert res.memory_frames == [0, 3, 6]

    full = HQSMemPipeline(load_config({"ablation": "full", "memory_interval": 1, "memory_capacity": 3,
                                       "device": "cpu"}), tracker=make_tracker(r50))
    sizes = []
    for t, frame in enumerate(frames):
        res = full.process(frame, prompts=prompts if t == 0 else None)
        # The tracker holds exactly what smart memory holds, prompt frame included.
        assert res.memory_frames == sorted(full.memory.frames)
        assert 0 in res.memory_frames and len(res.memory_frames) <= 3
        assert full.tracker.memory_tokens() == len(res.memory_frames) * full.tracker._groups[0].engine.enc_hw
        sizes.append(full.tracker.memory_bytes() / len(res.memory_frames))
    assert len(set(sizes)) == 1  # bytes per held frame never change: dropped frames are freed


def test_drop_memory_matches_engine_eviction_and_frees_rows(r50):
    # The engine's max_len_long_term evicts the oldest frame; dropping that frame through the
    # wrapper (before storing, as smart memory does) must give the same masks frame by frame.
    frames, label0 = scene(8)
    plain, _ = run_plain(r50[0], frames, {0: label0}, 2, max_len=3)
    tracker = make_tracker(r50)
    mine = run_wrapper(tracker, frames, {0: label0}, 2, max_len=3)
    for t, (a, b) in enumerate(zip(plain, mine), start=1):
        assert np.array_equal(a, b), f"frame {t}: {int((a != b).sum())} pixels differ"
    assert tracker.memory_frames() == [2, 4, 6]

    # Dropping a middle frame removes exactly its rows and frees the old tensors.
    hw = tracker._groups[0].engine.enc_hw
    before = [[None if e is None else e.clone() for e in mem] for mem in long_term(tracker)]
    old = weakref.ref(long_term(tracker)[0][0])
    bytes_before, tokens_before = tracker.memory_bytes(), tracker.memory_tokens()
    tracker.drop_memory(4)  # newest-first order: rows of 6, 4, 2
    gc.collect()
    assert old() is None
    assert tracker.memory_frames() == [2, 6]
    assert tracker.memory_tokens() == tokens_before - hw
    assert 0 < tracker.memory_bytes() < bytes_before
    assert bytes_before - tracker.memory_bytes() == pytest.approx(bytes_before / 3, rel=0.01)
    for mem, ref in zip(long_term(tracker), before):
        for e, r in zip(mem, ref):
            if r is not None:
                assert torch.equal(e, torch.cat([r[:hw], r[2 * hw:]]))
    tracker.drop_memory(4)  # not held any more: nothing happens
    assert tracker.memory_frames() == [2, 6]

    # Even an empty long-term memory (smart memory drops before it stores) keeps tracking.
    tracker.drop_memory(2)
    tracker.drop_memory(6)
    assert tracker.memory_frames() == [] and tracker.memory_tokens() == 0
    masks = tracker.track(8, frames[7])
    assert set(masks) == {1, 2}
    tracker.commit(8, frames[7], masks)
    tracker.store_memory(8)
    assert tracker.memory_frames() == [8] and tracker.memory_tokens() == hw


def test_store_drop_cycles_keep_memory_bounded_and_prompt_frame(r50):
    frames, label0 = scene(6)
    tracker = make_tracker(r50)
    sizes = []
    for t, frame in enumerate(frames):
        masks = tracker.track(t, frame)
        if t == 0:
            masks = to_masks(label0, (1, 2))
            tracker.add_objects(0, frame, masks)
        tracker.commit(t, frame, masks)
        if t > 0 and len(tracker.memory_frames()) >= 3:  # capacity 3, frame 0 pinned
            tracker.drop_memory(tracker.memory_frames()[1])
        tracker.store_memory(t)
        sizes.append(tracker.memory_bytes())
    assert tracker.memory_frames() == [0, 4, 5]
    assert len(set(sizes[2:])) == 1 and sizes[1] < sizes[2]

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    t = len(frames) - 1
    base_bytes, base_live = tracker.memory_bytes(), live_tensors()
    for _ in range(2000):
        tracker.drop_memory(t)
        tracker.store_memory(t)
    assert tracker.memory_bytes() == base_bytes
    assert live_tensors() == base_live
    assert tracker.memory_frames() == [0, 4, 5]
    assert tracker.memory_tokens() == 3 * tracker._groups[0].engine.enc_hw


def test_remove_object_frees_its_identity_everywhere(r50):
    frames, label0 = scene(7)
    third = np.zeros((H, W), np.uint8)
    third[36:46, 2:14] = 3
    tracker = make_tracker(r50, max_objects=3)
    run_wrapper(tracker, frames[:5], {0: label0 + third}, 2)
    assert tracker.memory_frames() == [0, 2, 4]
    eng = tracker._groups[0].engine
    kv_before = [[mem[0].clone(), mem[1].clone()] for mem in eng.long_term_memories]
    idv_before = [mem[3].clone() for mem in eng.long_term_memories]

    masks = tracker.track(5, frames[5])
    tracker.remove_objects([2])  # pipeline order: track, remove, commit
    masks.pop(2)
    with pytest.raises(ValueError, match="max_objects"):
        tracker.add_objects(5, frames[5], {7: label0 == 2, 8: label0 == 1})
    tracker.commit(5, frames[5], masks)
    assert tracker.object_ids == [1, 3]
    # No stored frame carries slot 2 any more; its ID_V equals the engine's fusion of the new label.
    hw = eng.enc_hw
    for i, sf in enumerate(tracker._groups[0].frames):
        assert not bool((sf.label == 2).any())
        with torch.inference_mode():
            id_emb = eng.assign_identity(one_hot_mask(sf.label.float(), eng.max_obj_num))
            for k, layer in enumerate(eng.AOT.LSTT.layers):
                want = layer.fuse_key_value_id(None, sf.id_inputs[k], id_emb)[1]
                assert torch.equal(eng.long_term_memories[k][3][i * hw:(i + 1) * hw], want)
    for mem, (k0, v0), idv in zip(eng.long_term_memories, kv_before, idv_before):
        assert torch.equal(mem[0], k0) and torch.equal(mem[1], v0)  # visual memory untouched
        assert not torch.equal(mem[3], idv)
    masks = tracker.track(6, frames[6])
    assert set(masks) == {1, 3}

    # The freed slot takes a new object, prompted as a reference frame.
    new = {9: label0 == 2}
    tracker.add_objects(6, frames[6], new)
    tracker.commit(6, frames[6], {**masks, **new})
    tracker.store_memory(6)
    assert tracker._slot_of[9][1] == 2 and tracker.object_ids == [1, 3, 9]
    assert tracker.memory_frames() == [0, 2, 4, 6]
    assert set(tracker.track(7, frames[6])) == {1, 3, 9}


def test_config_checks_and_official_checkpoint_layout(r50, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint"):
        DeAOTTracker.from_config({"model": "r50_deaotl"})
    with pytest.raises(ConfigError, match="memory_interval"):
        DeAOTTracker.from_config({"random_weights": True, "long_term_mem_gap": 5})
    with pytest.raises(ConfigError, match="prompt frame"):
        DeAOTTracker.from_config({"random_weights": True, "max_len_long_term": 5})
    with pytest.raises(ConfigError, match="tracker 'deaot': model must be one of r50_deaotl, .*got 'r51'"):
        DeAOTTracker.from_config({"model": "r51", "random_weights": True})
    with pytest.raises(ValueError, match="too small"):
        make_tracker(r50).add_objects(0, np.zeros((20, 20, 3), np.uint8), {1: np.ones((20, 20), bool)})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            DeAOTTracker.from_config({"model": "deaott", "random_weights": True}, device="cuda")

    # A checkpoint in the official layouts (training save with optimizer; DDP 'module.' keys).
    net, _ = build_model("deaott", seed=5)
    sd = net.state_dict()
    plain = tmp_path / "DeAOTT_PRE_YTB_DAV.pth"
    torch.save({"state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}}, plain)
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, ddp)
    for path in (plain, ddp):
        spec = {"type": "deaot", "model": "deaott", "checkpoint": str(path), "sha256": sha256_of_file(path)}
        tracker = registry.build("tracker", spec, device="cpu")
        loaded = tracker.net.state_dict()
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(CheckpointError, match="sha256"):
        DeAOTTracker.from_config({"model": "deaott", "checkpoint": str(plain), "sha256": "0" * 64})
    # The wrong model's file names the file, the model and the keys that do not fit.
    with pytest.raises(CheckpointError) as err:
        DeAOTTracker.from_config({"model": "r50_deaotl", "checkpoint": str(plain)})
    text = str(err.value)
    assert str(plain) in text and "r50_deaotl" in text
    assert "missing keys" in text and "unexpected keys" in text and "encoder.conv1.weight" in text
