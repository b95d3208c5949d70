"""Every shipped profile in config/ starts: with checkpoints this test creates (random weights saved
in the released files' layouts, at the file names the profile gives) the whole pipeline is built
from the profile and processes frames; without them, each neural part stops with an error that
names the file it needs and where users get it."""
from pathlib import Path

import numpy as np
import pytest
import torch

from hqsmem_ros.core import registry
from hqsmem_ros.core.config import load_config
from hqsmem_ros.core.pipeline import HQSMemPipeline, ObjectPrompt
from hqsmem_ros.models.checkpoints import CheckpointError

CONFIG = Path(__file__).parent.parent / "config"
PROFILES = sorted(p.name for p in CONFIG.glob("*.yaml"))
NEURAL = {"deaot", "sam2", "sam_hq", "dino"}
KINDS = ("tracker", "refiner", "features")


def test_every_profile_is_covered():
    assert {"track.yaml", "cpu.yaml", "jetson_orin.yaml", "paper_models.yaml", "sam2.yaml"} <= set(PROFILES)


def _released_layout(spec, part):
    """The state_dict of a random-weight part, wrapped as the official files are."""
    kind = spec["type"]
    if kind == "deaot":      # AOT/DeAOT training saves: {'state_dict': ...} (plus the optimizer)
        return {"state_dict": part.net.state_dict(), "optimizer": {"state": {}, "param_groups": []}}
    if kind == "sam2":       # sam2.1_hiera_*.pt: {'model': ...}
        return {"model": part.net.state_dict()}
    if kind == "sam_hq":     # sam_hq_vit_*.pth: the plain state_dict
        return part.model.state_dict()
    if kind == "dino":       # dinov2_vits14_pretrain.pth: timm's names plus the unused mask_token
        sd = dict(part.model.state_dict())
        if "dinov2" in spec.get("model_name", "dinov2"):
            sd["mask_token"] = torch.zeros(1, part.dim)
        return sd
    raise AssertionError(kind)


def _with_created_checkpoints(cfg, tmp_path):
    d = cfg.to_dict()
    d.update(device="cpu", precision="fp32")  # this machine has no GPU; precision: test_precision.py
    for kind in KINDS:
        spec = dict(d[kind])
        if spec["type"] not in NEURAL:
            continue
        assert spec.get("checkpoint"), f"{kind} {spec['type']} names no checkpoint"
        random_spec = {k: v for k, v in spec.items() if k not in ("checkpoint", "sha256")}
        part = registry.build(kind, dict(random_spec, random_weights=True, seed=11), "cpu", "fp32")
        path = tmp_path / Path(spec["checkpoint"]).name
        torch.save(_released_layout(spec, part), path)
        d[kind] = dict(spec, checkpoint=str(path))
    return load_config(d)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_starts_with_its_checkpoints(name, tmp_path):
    cfg = _with_created_checkpoints(load_config(CONFIG / name), tmp_path)
    pipeline = HQSMemPipeline(cfg)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(2)]
    mask = np.zeros((96, 128), bool)
    mask[30:70, 40:90] = True
    first = pipeline.process(frames[0], prompts=[ObjectPrompt(1, mask=mask)])
    second = pipeline.process(frames[1])
    assert first.label_map().shape == second.label_map().shape == (96, 128)
    assert second.frame == 1
    for kind in KINDS:
        spec = getattr(cfg, kind)
        if spec["type"] in NEURAL:  # the loaded weights are the created file's, not a fresh init
            assert str(tmp_path) in spec["checkpoint"]


@pytest.mark.parametrize("name", PROFILES)
def test_profile_without_its_checkpoints_names_them_and_their_source(name):
    cfg = load_config(CONFIG / name)
    for kind in KINDS:
        spec = dict(getattr(cfg, kind))
        if spec["type"] not in NEURAL:
            registry.build(kind, spec, "cpu", "fp32")  # the light parts start as shipped
            continue
        wanted = Path(spec["checkpoint"])
        assert not wanted.exists(), f"{wanted} exists on this machine: the test needs it absent"
        with pytest.raises(CheckpointError) as err:
            registry.build(kind, spec, "cpu", "fp32")
        msg = str(err.value)
        assert "file not found" in msg and wanted.name in msg and "github.com/" in msg, msg
