"""Safe checkpoint loading, strict key checks, device and precision resolution."""
import os
import pickle

import pytest
import torch

from hqsmem_ros.models import checkpoints as ck
from hqsmem_ros.models.checkpoints import CheckpointError, DeviceError


class _RunsCode:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Small(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3)
        self.head = torch.nn.Linear(width, 2)
        self.register_buffer("stat", torch.zeros(width))


def _state(width=4, seed=0):
    torch.manual_seed(seed)
    return _Small(width).state_dict()


def test_missing_file_names_file_and_model(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError) as err:
        ck.load_state_dict(path, "SAM-HQ vit_tiny")
    assert "nope.pth" in str(err.value) and "SAM-HQ vit_tiny" in str(err.value) and "not found" in str(err.value)


@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2", "pickle-protocol-4"])
def test_pickle_that_runs_code_is_refused_and_code_never_runs(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"conv.weight": torch.ones(1), "trap": _RunsCode(marker)}, path)
    else:
        payload = {"trap": _RunsCode(marker)}
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(writer[-1]))
    with pytest.raises(CheckpointError) as err:
        ck.load_state_dict(path, "DINO")
    msg = str(err.value)
    assert "refused" in msg and "evil.pth" in msg and "DINO" in msg
    if writer != "pickle-protocol-4":  # protocol 4 is refused at its first FRAME opcode already
        assert "system" in msg
    assert "weights_only` set to `False`" not in msg  # torch's unsafe advice is not repeated
    assert not marker.exists()


def test_sha256_mismatch_refused_before_unpickling(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"trap": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        ck.load_state_dict(path, "DINO", sha256="0" * 64)
    assert "sha256 mismatch" in str(err.value) and ck.sha256_of_file(path) in str(err.value)
    assert not marker.exists()


def test_sha256_match_loads_and_bad_format_refused(tmp_path):
    path = tmp_path / "w.pth"
    sd = _state()
    torch.save(sd, path)
    digest = ck.sha256_of_file(path)
    loaded = ck.load_state_dict(path, "small", sha256=digest.upper())
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(CheckpointError, match="64 hexadecimal"):
        ck.load_state_dict(path, "small", sha256="abc")


@pytest.mark.parametrize("content", ["truncated", "junk", "empty"])
def test_corrupt_files_give_clear_error(tmp_path, content):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(10000.0)}, good)
    data = good.read_bytes()
    path = tmp_path / "bad.pth"
    path.write_bytes({"truncated": data[: len(data) // 2], "junk": b"hello world", "empty": b""}[content])
    with pytest.raises(CheckpointError) as err:
        ck.load_state_dict(path, "SAM-HQ vit_b")
    assert "bad.pth" in str(err.value) and "SAM-HQ vit_b" in str(err.value)
    assert ("truncated or corrupt" if content == "truncated" else "not a PyTorch checkpoint") in str(err.value)


@pytest.mark.parametrize("content,words", [
    ("random", ["not a PyTorch checkpoint", "unknown data"]),
    ("html", ["not a PyTorch checkpoint", "HTML"]),
    ("lfs", ["not a PyTorch checkpoint", "git lfs pull"]),
])
def test_files_that_are_not_checkpoints_say_so(tmp_path, content, words):
    """Random bytes or a saved web page are not "pickled objects other than tensors"."""
    data = {"random": bytes(range(7, 256)) * 40,  # fixed bytes: never a zip or pickle header
            "html": b"\n  <!DOCTYPE html><html><head><title>Sign in</title></head></html>",
            "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n"}[content]
    path = tmp_path / "sam_hq_vit_b.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        ck.load_state_dict(path, "SAM-HQ vit_b")
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    assert "pickled objects" not in msg and "sam_hq_vit_b.pth" in msg


def test_safetensors_roundtrip_and_corrupt(tmp_path):
    from safetensors.torch import save_file

    sd = _state()
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    loaded = ck.load_state_dict(path, "small")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="bad.safetensors.*truncated or corrupt"):
        ck.load_state_dict(bad, "small")


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd, "epoch": 7, "optimizer": {"lr": 0.1}},
    lambda sd: {"state_dict": sd},
    lambda sd: {"model_state": sd},
    lambda sd: {"model": {"state_dict": sd}},
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
])
def test_wrapped_checkpoints_are_unwrapped(tmp_path, wrap):
    sd = _state()
    path = tmp_path / "w.pth"
    torch.save(wrap(sd), path)
    loaded = ck.load_state_dict(path, "small")
    assert sorted(loaded) == sorted(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_non_tensor_entries_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.ones(1), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not tensors.*epoch"):
        ck.load_state_dict(path, "small")


def test_apply_state_dict_loads_exactly():
    src = _state(seed=1)
    model = _Small()
    ck.apply_state_dict(model, src, "w.pth", "small")
    assert all(torch.equal(model.state_dict()[k], src[k]) for k in src)


def test_apply_state_dict_lists_missing_and_unexpected_keys():
    sd = _state()
    sd.pop("head.weight")
    sd.pop("head.bias")
    for i in range(7):
        sd[f"extra.{i}"] = torch.zeros(1)
    model = _Small()
    before = model.conv.weight.clone()
    with pytest.raises(CheckpointError) as err:
        ck.apply_state_dict(model, sd, "/tmp/x.pth", "model-A")
    msg = str(err.value)
    assert "x.pth" in msg and "model-A" in msg
    assert "2 missing keys (head.weight, head.bias)" in msg
    assert "7 unexpected keys (extra.0, extra.1, extra.2, extra.3, extra.4, ... (2 more))" in msg
    assert torch.equal(model.conv.weight, before)  # nothing loaded on failure


def test_apply_state_dict_reports_shape_mismatch_and_hint():
    wide = _state(width=8)
    with pytest.raises(CheckpointError) as err:
        ck.apply_state_dict(_Small(width=4), wide, "w.pth", "small", hint="It looks like a wide one.")
    msg = str(err.value)
    assert "shape mismatches" in msg and "conv.weight: checkpoint (8, 3, 3, 3) vs model (4, 3, 3, 3)" in msg
    assert msg.endswith("It looks like a wide one.")


def test_optional_keys_may_be_missing():
    sd = _state(seed=2)
    sd.pop("head.weight")
    sd.pop("head.bias")
    model = _Small()
    ck.apply_state_dict(model, sd, "w.pth", "small", optional_missing=(r"head\..*",))
    assert torch.equal(model.conv.weight, sd["conv.weight"])
    with pytest.raises(CheckpointError, match="missing keys"):
        ck.apply_state_dict(model, sd, "w.pth", "small", optional_missing=(r"conv\..*",))


def test_resolve_device_cpu_and_auto():
    assert ck.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ck.resolve_device("auto").type == expected
    with pytest.raises(DeviceError, match="'tpu'"):
        ck.resolve_device("tpu")


def test_resolve_device_cuda_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            ck.resolve_device(name)
    assert ck.resolve_device("auto") == torch.device("cpu")


def test_resolve_device_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="only 1 CUDA device"):
        ck.resolve_device("cuda:3")


def test_precision_rules_and_cpu_autocast(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ck.CPU_FP16_SWITCH, raising=False)
    with pytest.raises(DeviceError, match="fp16.*CUDA"):
        ck.check_precision(cpu, "fp16")
    with pytest.raises(DeviceError, match="precision must be"):
        ck.check_precision(cpu, "fp8")
    a = torch.ones(4, 4)
    with ck.autocast_context(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32
    with ck.autocast_context(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_cpu_fp16_only_with_the_switch_and_with_a_warning(monkeypatch, caplog):
    """fp16 on the CPU is for checking the GPU profiles' numerics: allowed by HQSMEM_CPU_FP16=1
    alone, where torch's CPU autocast has float16, and it says that it is slow."""
    if not ck.cpu_autocast_has_float16():
        pytest.skip("this torch's CPU autocast has no float16")
    cpu, a = torch.device("cpu"), torch.ones(4, 4)
    for value in ("0", "yes"):
        monkeypatch.setenv(ck.CPU_FP16_SWITCH, value)
        with pytest.raises(DeviceError, match=f"on the CPU use 'fp32' or 'bf16'.*{ck.CPU_FP16_SWITCH}=1"):
            ck.autocast_context(cpu, "fp16")
    monkeypatch.setenv(ck.CPU_FP16_SWITCH, "1")
    ck._warn_cpu_fp16_once.cache_clear()
    with caplog.at_level("WARNING", logger=ck.__name__):
        assert ck.check_precision(cpu, " FP16 ") == "fp16"
        with ck.autocast_context(cpu, "fp16"):
            assert (a @ a).dtype == torch.float16
    assert [r.getMessage() for r in caplog.records if "fp16" in r.getMessage()] == [
        "precision fp16 on the CPU (HQSMEM_CPU_FP16=1): for checking fp16 numerics only; float16 is emulated "
        "on most CPUs and runs far slower than fp32 or bf16"]  # once, not per call
