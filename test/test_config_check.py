"""One rule for configuration keys (hqsmem_ros/core/config_check.py), without ROS."""
import pytest

from hqsmem_ros.core.config import ConfigError, load_config
from hqsmem_ros.core.config_check import (check_node_parameters, collect_node_parameters,
                                          file_parameters, override_parameters)

NODE = {"qos_depth": 5, "qos_reliability": "best_effort", "overlay_alpha": 0.5, "publish_overlay": True}


def check(params):
    check_node_parameters({k: (v, "test.yaml") for k, v in params.items()}, NODE)


def test_known_keys_of_the_right_type_pass():
    check({"qos_depth": 3, "overlay_alpha": 1, "publish_overlay": False, "use_sim_time": True,
           "qos_overrides./image.subscription.depth": 3, "pipeline.tau_verify": 1,
           "pipeline.tracker.type": "flow", "pipeline.tracker.any_model_key": 3, "pipeline.refine": ""})


@pytest.mark.parametrize("params,words", [
    ({"qos_dpeth": 3}, ["test.yaml", "unknown key 'qos_dpeth'", "did you mean 'qos_depth'?"]),
    ({"pipeline.tau_verfy": 0.5}, ["did you mean 'pipeline.tau_verify'?"]),
    ({"pipeline": 3}, ["unknown key 'pipeline'"]),
    ({"zzz": 1}, ["unknown key 'zzz'"]),
    ({"qos_depth": "abc"}, ["'qos_depth' must be an integer, got 'abc'"]),
    ({"qos_depth": True}, ["must be an integer"]),
    ({"publish_overlay": 1}, ["must be a boolean"]),
    ({"pipeline.tau_verify": "abc"}, ["test.yaml", "tau_verify must be a number"]),
    ({"pipeline.memory_capacity": 0}, ["memory_capacity"]),
])
def test_unknown_keys_and_wrong_types_are_errors_naming_them(params, words):
    with pytest.raises(ConfigError) as e:
        check(params)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_files_and_overrides_are_collected_in_rcl_order(tmp_path):
    (tmp_path / "ros.yaml").write_text(
        "/**:\n  ros__parameters:\n    qos_depth: 3\n    pipeline:\n      tau_verify: 0.5\n"
        "other_node:\n  ros__parameters:\n    not_ours: 1\n")
    (tmp_path / "plain.yaml").write_text("tau_verify: 0.7\ntracker: {type: flow}\n")
    assert file_parameters(tmp_path / "ros.yaml", "hqsmem_node") == {"qos_depth": 3, "pipeline.tau_verify": 0.5}
    assert file_parameters(tmp_path / "plain.yaml", "x") == {"pipeline.tau_verify": 0.7, "pipeline.tracker.type": "flow"}
    assert override_parameters(["--ros-args", "-p", "qos_depth:=abc", "-r", "a:=b", "-p", "x:=1.5"]) == [
        ("qos_depth", "abc", "-p qos_depth:=abc"), ("x", 1.5, "-p x:=1.5")]
    params = collect_node_parameters(str(tmp_path / "ros.yaml"),
                                     ["--ros-args", "--params-file", str(tmp_path / "plain.yaml"),
                                      "-p", "qos_depth:=7"], "hqsmem_node")
    assert params["qos_depth"] == (7, "-p qos_depth:=7")
    assert params["pipeline.tau_verify"] == (0.7, str(tmp_path / "plain.yaml"))


def test_plain_config_typos_get_a_suggestion(tmp_path):
    (tmp_path / "c.yaml").write_text("memory_capacty: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*memory_capacty.*did you mean 'memory_capacity'"):
        load_config(tmp_path / "c.yaml")


def test_a_model_blocks_precision_is_checked_as_the_pipelines_naming_the_block_and_where(tmp_path):
    cfg = load_config({"precision": "bf16", "refiner": {"type": "sam_hq", "precision": "fp32"}})
    assert (cfg.model_precision("refiner"), cfg.model_precision("tracker")) == ("fp32", "bf16")
    with pytest.raises(ConfigError, match=r"^refiner\.precision must be one of fp32, fp16, bf16 or null, got 'fp8'$"):
        load_config({"refiner": {"type": "sam_hq", "precision": "fp8"}})
    (tmp_path / "c.yaml").write_text("features: {type: dino, precision: half}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: features\.precision must be .*got 'half'"):
        load_config(tmp_path / "c.yaml")
    # The node's check names the parameter's source, not the other keys beside it.
    with pytest.raises(ConfigError) as e:
        check_node_parameters({"pipeline.precision": ("bf16", "a.yaml"), "pipeline.tracker.type": ("deaot", "a.yaml"),
                               "pipeline.tracker.precision": ("FP16", "-p pipeline.tracker.precision:=FP16"),
                               "pipeline.tracker.model": ("deaott", "a.yaml")}, NODE)
    assert str(e.value).startswith("-p pipeline.tracker.precision:=FP16: tracker.precision must be"), str(e.value)


def test_a_block_precision_on_a_weight_free_model_is_refused_naming_the_key():
    from hqsmem_ros.core import registry

    with pytest.raises(ConfigError, match=r"refiner\.precision 'bf16': refiner 'watershed' has no weights"):
        registry.build("refiner", {"type": "watershed", "precision": "bf16"}, "cpu", "fp32")
    registry.build("refiner", {"type": "watershed"}, "cpu", "bf16")  # the pipeline's: ignored, as before
