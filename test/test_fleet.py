"""`hqsmem bags` on real rosbag2 files written here (mcap and sqlite3): a local pool of 2 worker
processes and a local Ray cluster give the messages of single-bag `hqsmem bag` runs, bag for
bag; a failing bag does not stop the others; complete outputs are skipped, changed inputs or
configs are processed again; a run killed mid-way resumes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rosbags.rosbag2 import Reader

from hqsmem_ros.cli import main
from hqsmem_ros.tools.synth_bag import write_synthetic_bag
from hqsmem_ros.fleet import MANIFEST_SUFFIX, SUMMARY_NAME, run_bags

TOPIC = "/camera/image_raw"
SIZE = (96, 72)
# name -> (storage, image format, frames, seed); names sort in processing order
BAGS = {"a_mcap": ("mcap", "rgb8", 12, 1), "b_sqlite": ("sqlite3", "rgb8", 12, 2),
        "c_jpeg": ("mcap", "jpeg", 12, 3), "d_sqlite_png": ("sqlite3", "png", 10, 4)}


def all_raw(bag):
    with Reader(bag) as reader:
        return [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]


def hqsmem(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Input bags (prompts files beside them) and each one's single-bag `hqsmem bag` output."""
    root = tmp_path_factory.mktemp("fleet")
    bags = root / "bags"
    bags.mkdir()
    refs = {}
    for name, (storage, fmt, frames, seed) in BAGS.items():
        info = write_synthetic_bag(bags / name, frames=frames, size=SIZE, storage=storage, image_format=fmt,
                                   seed=seed, prompts="file")
        ref = root / "ref" / name
        assert main(["bag", str(bags / name), str(ref), "--image-topic", TOPIC, "--prompts",
                     str(info["prompts_file"]), "--quiet"]) == 0
        refs[name] = all_raw(ref)
    return {"root": root, "bags": bags, "refs": refs}


def assert_same_as_single_runs(out, refs, names):
    for name in names:
        got = all_raw(out / name)
        assert got == refs[name], f"{name}: output differs from the single-bag run"
        assert any(t == "/hqsmem_node/masks" for t, *_ in got)


def test_local_pool_same_messages_as_single_bag_runs_then_resume(fleet, capsys, tmp_path):
    out = tmp_path / "out"
    code, text, err = hqsmem(capsys, "bags", fleet["bags"], "--out", out, "--prompts-dir", fleet["bags"],
                             "--workers", 2)
    assert code == 0, err
    assert_same_as_single_runs(out, fleet["refs"], BAGS)
    report = json.loads((out / SUMMARY_NAME).read_text())
    assert report["workers"] == 2 and report["backend"] == "local"
    assert [b["name"] for b in report["bags"]] == sorted(BAGS)
    assert {b["status"] for b in report["bags"]} == {"done"}
    # 4 bags on 2 workers: some worker ran 2 bags with the models it built once
    assert len({b["worker"] for b in report["bags"]}) <= 2
    for b in report["bags"]:
        s = b["summary"]
        assert s["frames_in"] == BAGS[b["name"]][2] == s["results"] + s["dropped_total"]
    assert "a_mcap" in text and "done 4, skipped 0" in text
    assert not (out / ".hqsmem-bags-work").exists()

    # Again: every complete output is skipped, nothing rewritten.
    mtimes = {n: (out / n / "metadata.yaml").stat().st_mtime_ns for n in BAGS}
    code, text, _ = hqsmem(capsys, "bags", fleet["bags"], "--out", out, "--prompts-dir", fleet["bags"],
                           "--workers", 2, "--json", "--quiet")
    assert code == 0
    again = json.loads(text)
    assert [b["status"] for b in again["bags"]] == ["skipped"] * 4
    assert {n: (out / n / "metadata.yaml").stat().st_mtime_ns for n in BAGS} == mtimes

    # Another config: every bag is processed again (its manifest no longer matches).
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("memory_capacity: 4\n")
    code, text, _ = hqsmem(capsys, "bags", fleet["bags"] / "a_mcap", fleet["bags"] / "b_sqlite", "--out", out,
                           "--prompts-dir", fleet["bags"], "--config", cfg, "--workers", 1, "--json", "--quiet")
    assert code == 0
    assert [b["status"] for b in json.loads(text)["bags"]] == ["done", "done"]
    manifest = json.loads((out / ("a_mcap" + MANIFEST_SUFFIX)).read_text())
    assert manifest["summary"]["frames_in"] == 12 and manifest["outputs"]


def test_changed_input_or_prompts_or_force_reprocess(fleet, capsys, tmp_path):
    bags = tmp_path / "bags"
    shutil.copytree(fleet["bags"], bags)
    out = tmp_path / "out"
    args = ["bags", bags / "a_mcap", bags / "b_sqlite", "--out", out, "--prompts-dir", bags, "--json", "--quiet",
            "--workers", 1]
    assert hqsmem(capsys, *args)[0] == 0
    prompts = bags / "b_sqlite.prompts.yaml"
    prompts.write_text(prompts.read_text().replace("label: object1", "label: renamed"))
    code, text, _ = hqsmem(capsys, *args)
    assert code == 0
    assert [b["status"] for b in json.loads(text)["bags"]] == ["skipped", "done"]
    os.utime(bags / "a_mcap" / "a_mcap.mcap", ns=(1, 1))  # a re-recorded input: other mtime
    code, text, _ = hqsmem(capsys, *args)
    assert [b["status"] for b in json.loads(text)["bags"]] == ["done", "skipped"]
    code, text, _ = hqsmem(capsys, *args, "--force")
    assert [b["status"] for b in json.loads(text)["bags"]] == ["done", "done"]
    assert all_raw(out / "a_mcap") == fleet["refs"]["a_mcap"]
    # An output this command did not write (no manifest) is not replaced without --force.
    shutil.rmtree(out)
    (out / "a_mcap").mkdir(parents=True)
    code, text, _ = hqsmem(capsys, *args)
    rows = json.loads(text)["bags"]
    assert code == 1 and rows[0]["status"] == "failed" and "--force" in rows[0]["error"]
    assert rows[1]["status"] == "done"


def test_failing_bags_do_not_stop_the_others(fleet, capsys, tmp_path):
    bags = tmp_path / "bags"
    bags.mkdir()
    shutil.copytree(fleet["bags"] / "a_mcap", bags / "a_mcap")
    shutil.copy(fleet["bags"] / "a_mcap.prompts.yaml", bags)
    shutil.copy(fleet["bags"] / "a_mcap.prompt0.png", bags)
    # a recording cut off: the mcap file without its second half
    data = (fleet["bags"] / "c_jpeg" / "c_jpeg.mcap").read_bytes()
    (bags / "b_cut.mcap").write_bytes(data[: len(data) // 2])
    shutil.copy(fleet["bags"] / "c_jpeg.prompts.yaml", bags / "b_cut.prompts.yaml")
    shutil.copy(fleet["bags"] / "c_jpeg.prompt0.png", bags)
    # a bag without the image topic
    write_synthetic_bag(bags / "c_other_topic", frames=3, size=SIZE, topic="/other/image", prompts="file")
    # a bag without a prompts file
    write_synthetic_bag(bags / "d_no_prompts", frames=3, size=SIZE, prompts=None)
    out = tmp_path / "out"
    code, text, err = hqsmem(capsys, "bags", bags, "--out", out, "--prompts-dir", bags, "--image-topic", TOPIC,
                             "--workers", 2)
    assert code == 1
    report = json.loads((out / SUMMARY_NAME).read_text())
    rows = {b["name"]: b for b in report["bags"]}
    assert rows["a_mcap"]["status"] == "done"
    assert all_raw(out / "a_mcap") == fleet["refs"]["a_mcap"]
    assert rows["b_cut"]["status"] == "failed" and "b_cut.mcap" in rows["b_cut"]["error"]
    assert rows["c_other_topic"]["status"] == "failed" and TOPIC in rows["c_other_topic"]["error"]
    assert rows["d_no_prompts"]["status"] == "failed" and "prompts" in rows["d_no_prompts"]["error"]
    for name in ("b_cut", "c_other_topic", "d_no_prompts"):
        assert not (out / name).exists() and not (out / (name + MANIFEST_SUFFIX)).exists()
    assert report["totals"]["failed"] == 3 and report["totals"]["done"] == 1
    assert "errors:" in text and "b_cut:" in text


def test_usage_errors_exit_2(fleet, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = hqsmem(capsys, "bags", empty, "--out", tmp_path / "o")
    assert code == 2 and "no bags in folder" in err
    code, _, err = hqsmem(capsys, "bags", tmp_path / "missing", "--out", tmp_path / "o")
    assert code == 2 and "input not found" in err
    twin = tmp_path / "twin"
    shutil.copytree(fleet["bags"] / "a_mcap", twin / "a_mcap")
    code, _, err = hqsmem(capsys, "bags", fleet["bags"] / "a_mcap", twin / "a_mcap", "--out", tmp_path / "o")
    assert code == 2 and "both be written" in err
    code, _, err = hqsmem(capsys, "bags", fleet["bags"] / "a_mcap", "--out", tmp_path / "o", "--ship-checkpoints")
    assert code == 2 and "--ray" in err


def test_ray_missing_is_a_clear_error(fleet, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from hqsmem_ros.cli import main\n"
            f"sys.exit(main(['bags', {str(fleet['bags'] / 'a_mcap')!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--ray', 'auto']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "pip install 'hqsmem_ros[cluster]'" in r.stderr and r.stderr.count("\n") == 1


def test_resume_after_a_killed_run(fleet, tmp_path):
    bags = tmp_path / "bags"
    bags.mkdir()
    shutil.copytree(fleet["bags"] / "a_mcap", bags / "a_mcap")
    for f in ("a_mcap.prompts.yaml", "a_mcap.prompt0.png"):
        shutil.copy(fleet["bags"] / f, bags)
    # a long second bag: the run is killed while it is being processed
    long_info = write_synthetic_bag(bags / "b_long", frames=400, size=(160, 120), storage="sqlite3", seed=5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hqsmem_ros.cli", "bags", str(bags), "--out", str(out), "--prompts-dir", str(bags),
           "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        first = out / ("a_mcap" + MANIFEST_SUFFIX)
        deadline = time.time() + 300
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert first.exists(), proc.communicate(timeout=30)
        assert not (out / ("b_long" + MANIFEST_SUFFIX)).exists()  # b_long (400 frames) has just begun
        os.kill(proc.pid, signal.SIGKILL)  # the command only: its worker must go with it
        proc.wait(timeout=30)
        deadline = time.time() + 60
        while _session_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _session_alive(proc.pid), "a worker outlived the killed command"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert (out / "a_mcap").is_dir() and not (out / "b_long").exists()
    a_mtime = (out / "a_mcap" / "metadata.yaml").stat().st_mtime_ns
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {b["name"]: b for b in json.loads(r.stdout)["bags"]}
    assert rows["a_mcap"]["status"] == "skipped" and rows["b_long"]["status"] == "done"
    assert (out / "a_mcap" / "metadata.yaml").stat().st_mtime_ns == a_mtime
    assert not (out / ".hqsmem-bags-work").exists()
    ref = tmp_path / "ref_b"
    assert main(["bag", str(bags / "b_long"), str(ref), "--image-topic", TOPIC, "--prompts",
                 str(long_info["prompts_file"]), "--quiet"]) == 0
    assert all_raw(out / "b_long") == all_raw(ref)


def _session_alive(sid):
    import psutil
    alive = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.info["pid"]) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.info["pid"])
        except (ProcessLookupError, psutil.Error, PermissionError):
            pass
    return alive


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")  # the [cluster] extra; installed by scripts/setup_venv.sh
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test cluster
    # workers inherit this environment (PYTHONPATH included), so they import this checkout
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_ray_same_messages_as_single_bag_runs(fleet, ray_cluster, tmp_path):
    out = tmp_path / "out"
    report = run_bags([fleet["bags"]], out, prompts_dir=fleet["bags"], ray_address="auto", workers=2,
                      progress=False, log=lambda text: None)
    assert report["backend"] == "ray" and report["totals"]["all_ok"]
    assert [b["status"] for b in report["bags"]] == ["done"] * 4
    assert_same_as_single_runs(out, fleet["refs"], BAGS)
    assert len(report["worker_load_s"]) == 2
    again = run_bags([fleet["bags"]], out, prompts_dir=fleet["bags"], ray_address="auto", workers=2,
                     progress=False, log=lambda text: None)
    assert [b["status"] for b in again["bags"]] == ["skipped"] * 4


def test_ray_failing_bag_does_not_stop_the_others(fleet, ray_cluster, tmp_path):
    bags = tmp_path / "bags"
    bags.mkdir()
    data = (fleet["bags"] / "a_mcap" / "a_mcap.mcap").read_bytes()
    (bags / "cut.mcap").write_bytes(data[: len(data) // 3])
    shutil.copytree(fleet["bags"] / "b_sqlite", bags / "b_sqlite")
    out = tmp_path / "out"
    report = run_bags([bags], out, ray_address="auto", workers=2, progress=False, log=lambda text: None,
                      image_topic=TOPIC)
    rows = {b["name"]: b for b in report["bags"]}
    assert rows["b_sqlite"]["status"] == "done" and rows["cut"]["status"] == "failed"
    assert "cut.mcap" in rows["cut"]["error"] and not report["totals"]["all_ok"]


def test_a_worker_builds_neural_models_once_and_gives_fresh_runs_output(tmp_path, capsys):
    """DeAOT (random weights) keeps memory per stream: a worker hands the same model to each bag's
    pipeline, which resets it; the outputs equal fresh single-bag runs, bag for bag."""
    pytest.importorskip("aot")  # deaotpy, installed by scripts/setup_venv.sh
    cfg = tmp_path / "deaot.yaml"
    cfg.write_text("tracker: {type: deaot, model: r50_deaotl, random_weights: true}\ndevice: cpu\n")
    bags = tmp_path / "bags"
    bags.mkdir()
    refs = {}
    for k, name in enumerate(("a", "b")):
        info = write_synthetic_bag(bags / name, frames=2, size=SIZE, seed=10 + k, prompts="file",
                                   camera_info=False)
        ref = tmp_path / "ref" / name
        assert main(["bag", str(bags / name), str(ref), "--image-topic", TOPIC, "--prompts",
                     str(info["prompts_file"]), "--config", str(cfg), "--allow-random-weights", "--quiet"]) == 0
        refs[name] = all_raw(ref)
    capsys.readouterr()
    out = tmp_path / "out"
    code, text, err = hqsmem(capsys, "bags", bags, "--out", out, "--prompts-dir", bags, "--config", cfg,
                             "--allow-random-weights", "--workers", 1, "--json", "--quiet")
    assert code == 0, err
    report = json.loads(text)
    assert len(report["worker_load_s"]) == 1  # one worker, models built once
    assert len({b["worker"] for b in report["bags"]}) == 1
    assert_same_as_single_runs(out, refs, ("a", "b"))


def test_ray_ship_checkpoints_through_the_object_store(fleet, ray_cluster, tmp_path):
    """A config naming a checkpoint (DINO ViT-S/16, random weights saved by this test, with its
    sha256): with --ship-checkpoints the actors get the file's bytes from Ray's object store and
    load them from their own copy (the checksum is checked there); same output as a single run.
    (On this one-machine cluster the actors could also read the path; the copy is what they use.)"""
    torch = pytest.importorskip("torch")
    from hqsmem_ros.models.checkpoints import sha256_of_file
    from hqsmem_ros.models.dino import DinoFeatureExtractor

    ckpt = tmp_path / "dino_vits16.pth"
    extractor = DinoFeatureExtractor.from_config({"model_name": "dino_vits16", "random_weights": True,
                                                  "input_size": 64}, device="cpu")
    torch.save(extractor.model.state_dict(), ckpt)
    cfg = tmp_path / "dino.yaml"
    cfg.write_text(f"features: {{type: dino, model_name: dino_vits16, input_size: 64, checkpoint: {ckpt}, "
                   f"sha256: {sha256_of_file(ckpt)}}}\ndevice: cpu\n")
    bag = fleet["bags"] / "a_mcap"
    ref = tmp_path / "ref"
    assert main(["bag", str(bag), str(ref), "--image-topic", TOPIC, "--prompts",
                 str(fleet["bags"] / "a_mcap.prompts.yaml"), "--config", str(cfg), "--quiet"]) == 0
    out = tmp_path / "out"
    import glob
    import tempfile
    from hqsmem_ros.fleet.workers import SHIPPED_COPY_PREFIX
    copies = os.path.join(tempfile.gettempdir(), f"{SHIPPED_COPY_PREFIX}{os.getpid()}-*")  # this run's only
    before = set(glob.glob(copies))
    report = run_bags([bag], out, prompts_dir=fleet["bags"], config=str(cfg), ray_address="auto", workers=1,
                      ship_checkpoints=True, progress=False, log=lambda text: None)
    assert set(glob.glob(copies)) <= before  # the actors' copies are removed at the end
    assert report["totals"]["all_ok"], report["bags"][0]["error"]
    assert all_raw(out / "a_mcap") == all_raw(ref)
    manifest = json.loads((out / ("a_mcap" + MANIFEST_SUFFIX)).read_text())
    assert manifest["key"]["checkpoints"][0]["file"] == str(ckpt.resolve())


def test_a_worker_killed_mid_bag_fails_that_bag_only(fleet, tmp_path):
    """The worker process dies (SIGKILL) while it writes the first bag: that bag is reported
    failed with the reason, a new worker takes the next bag, the exit status is 1."""
    import psutil

    bags = tmp_path / "bags"
    bags.mkdir()
    write_synthetic_bag(bags / "a_long", frames=400, size=(160, 120), seed=6)
    shutil.copytree(fleet["bags"] / "b_sqlite", bags / "b_sqlite")
    for f in ("b_sqlite.prompts.yaml", "b_sqlite.prompt0.png"):
        shutil.copy(fleet["bags"] / f, bags)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hqsmem_ros.cli", "bags", str(bags), "--out", str(out), "--prompts-dir", str(bags),
           "--workers", "1", "--quiet", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        work = out / ".hqsmem-bags-work"
        deadline = time.time() + 300
        while not (work.is_dir() and any(work.iterdir())) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # the staging folder of a_long's output: the worker is writing it
        workers = [c for c in psutil.Process(proc.pid).children()
                   if any("spawn_main" in part for part in c.cmdline())]  # not multiprocessing's resource tracker
        assert len(workers) == 1, proc.communicate(timeout=60)
        workers[0].kill()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    rows = {b["name"]: b for b in json.loads(stdout)["bags"]}
    assert rows["a_long"]["status"] == "failed" and "worker process died" in rows["a_long"]["error"]
    assert rows["b_sqlite"]["status"] == "done"
    assert all_raw(out / "b_sqlite") == fleet["refs"]["b_sqlite"]
    assert not (out / "a_long").exists() and not (out / ".hqsmem-bags-work").exists()
