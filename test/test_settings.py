"""Settings dataclasses (core/settings.py): one validation path for every model's parameters and
PipelineConfig's keys, with messages that name the model, the key, the value and what is allowed."""
import dataclasses

import pytest

from hqsmem_ros.core import registry
from hqsmem_ros.core.config import ConfigError, PipelineConfig
from hqsmem_ros.core.settings import parse_settings, setting, settings_info
from hqsmem_ros.models.flow_tracker import FlowTracker
from hqsmem_ros.models.histogram_features import HistogramFeatures
from hqsmem_ros.models.watershed_refiner import WatershedRefiner

WEIGHT_FREE = [("tracker", "flow"), ("refiner", "watershed"), ("refiner", "color"), ("features", "histogram")]


@pytest.mark.parametrize("kind,spec,pattern", [
    # unknown key: the model, the key, a near miss, the known keys
    ("tracker", {"type": "flow", "colour_bins": [4, 32]},
     r"tracker 'flow': unknown parameter 'colour_bins'; did you mean 'color_bins'.*\(known: flow_preset, .*color_bins, .*\)"),
    ("refiner", {"type": "watershed", "band": [1, 2, 3], "x": 1},
     r"refiner 'watershed': unknown parameters 'band', 'x'; did you mean 'bands'.*known: bands, min_band"),
    ("features", {"type": "histogram", "grids": 8}, r"features 'histogram': unknown parameter 'grids'.*known: .*grid"),
    # wrong type: the key, what it takes, the value
    ("tracker", {"type": "flow", "flow_weight": "2"}, r"tracker 'flow': flow_weight must be a number >= 0, got '2'"),
    ("tracker", {"type": "flow", "others_as_background": 1},
     r"tracker 'flow': others_as_background must be true or false, got 1"),
    ("refiner", {"type": "watershed", "bands": [0.1, 0.2]}, r"refiner 'watershed': bands must be 3 numbers >= 0, got \[0.1, 0.2\]"),
    ("features", {"type": "histogram", "grid": 8.0}, r"features 'histogram': grid must be an integer >= 1, got 8.0"),
    ("features", {"type": "histogram", "grid": True}, r"grid must be an integer >= 1, got True"),
    # out of range, choices, rules
    ("tracker", {"type": "flow", "anchor_weight": 1.5}, r"tracker 'flow': anchor_weight must be a number in \[0, 1\], got 1.5"),
    ("tracker", {"type": "flow", "flow_preset": "slow"},
     r"tracker 'flow': flow_preset must be one of ultrafast, fast, medium, got 'slow'"),
    ("tracker", {"type": "flow", "color_bins": [4, 48]}, r"color_bins must be two powers of two.*got \[4, 48\]"),
    ("refiner", {"type": "watershed", "min_band": -1}, r"refiner 'watershed': min_band must be an integer >= 0, got -1"),
    ("features", {"type": "histogram", "context_width": 0}, r"features 'histogram': context_width must be an integer >= 1, got 0"),
    ("features", {"type": "histogram", "context_weight": float("nan")}, r"context_weight must be a number >= 0, got nan"),
])
def test_bad_model_parameters_are_config_errors_naming_model_key_value_and_what_is_allowed(kind, spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        registry.build(kind, spec, "cpu")


def test_neural_models_refuse_through_the_same_path_before_loading_anything():
    # No checkpoint is needed to be told about a bad key: the settings are checked first.
    with pytest.raises(ConfigError, match=r"tracker 'deaot': max_objects must be an integer >= 1, got 0"):
        registry.build("tracker", {"type": "deaot", "max_objects": 0}, "cpu")
    with pytest.raises(ConfigError, match=r"refiner 'sam_hq': model_type must be one of vit_tiny, .*got 'vit_s'"):
        registry.build("refiner", {"type": "sam_hq", "model_type": "vit_s"}, "cpu")
    with pytest.raises(ConfigError, match=r"features 'dino': seed must be an integer, got '1'"):
        registry.build("features", {"type": "dino", "seed": "1", "random_weights": True}, "cpu")
    with pytest.raises(ConfigError, match=r"tracker 'sam2': image_size must be a multiple of 32, at least 64 or null, got 100"):
        registry.build("tracker", {"type": "sam2", "image_size": 100, "random_weights": True}, "cpu")


def test_accepted_forms_are_converted_to_the_settings_types():
    # YAML and ROS give lists for tuples and integers for numbers; null unsets an optional one.
    tracker = registry.build("tracker", {"type": "flow", "redetect_area_range": [1, 3], "flow_weight": 2,
                                         "color_bins": [8, 32]}, "cpu")
    assert tracker.redetect_area_range == (1.0, 3.0) and isinstance(tracker.redetect_area_range[0], float)
    assert tracker.flow_weight == 2.0 and isinstance(tracker.flow_weight, float)
    assert tracker.color_bins == (8, 32) and tracker._n_bins == 8 * 32 * 32
    refiner = registry.build("refiner", {"type": "watershed", "lines_to_background": None}, "cpu")
    assert refiner.lines_to_background is None
    assert FlowTracker(smooth=4).smooth == 5  # the constructor takes the same keywords, same path


@pytest.mark.parametrize("kind,name", WEIGHT_FREE)
def test_every_setting_given_explicitly_at_its_default_builds_the_same_model(kind, name):
    cls = registry.model_class(kind, name)
    defaults = {i.name: i.default for i in settings_info(cls.Settings)}
    assert defaults, f"{name} declares no settings"
    plain, explicit = registry.build(kind, {"type": name}, "cpu"), registry.build(kind, {"type": name, **defaults}, "cpu")
    for key in defaults:
        if hasattr(plain, key):
            assert getattr(plain, key) == getattr(explicit, key), key


def test_weight_free_models_keep_their_defaults():
    # The defaults the models had as constructor keywords (tuned on DAVIS, docs/benchmarks.md).
    t = FlowTracker()
    assert (t.flow_preset, t.flow_weight, t.anchor_weight, t.color_bins, t.redetect_every, t.smooth) == \
        ("fast", 2.0, 0.5, (4, 32), 2, 5)
    r = WatershedRefiner()
    assert (r.bands, r.min_band, r.margin, r.lines_to_background) == ((0.02, 0.04, 0.08), 1, 0.3, True)
    f = HistogramFeatures()
    assert (f.gradient_weight, f.position_weight, f.grid, f.context_weight, f.context_width) == (0.5, 2.0, 32, 0.0, 2)


def test_every_registered_model_declares_its_settings_with_meanings():
    for kind in ("tracker", "refiner", "features"):
        for name in registry.names(kind):
            cls = registry.model_class(kind, name)
            assert dataclasses.is_dataclass(cls.Settings), name
            for info in settings_info(cls.Settings):
                assert len(info.description) > 10, (name, info.name)
                parse_settings(cls.Settings, {info.name: info.default}, name)  # its default is allowed


def test_a_field_without_a_meaning_is_refused():
    @dataclasses.dataclass
    class Bad:
        ok: int = setting(1, "an integer setting")
        bare: int = 2

    with pytest.raises(TypeError, match="Bad.bare is not declared with setting"):
        list(settings_info(Bad))


def test_pipeline_keys_go_through_the_same_path():
    with pytest.raises(ConfigError, match=r"^tau_memory must be a number in \[-1, 1\], got 1.5$"):
        PipelineConfig.from_dict({"tau_memory": 1.5})
    with pytest.raises(ConfigError, match=r"^process_max_side must be 0 or an integer >= 32 or null, got 16$"):
        PipelineConfig.from_dict({"process_max_side": 16})
    with pytest.raises(ConfigError, match=r"^memory_interval_s must be a number > 0 or null, got 0$"):
        PipelineConfig.from_dict({"memory_interval_s": 0})
    with pytest.raises(ConfigError, match=r"^refine must be one of off, always, gated or null, got 'sometimes'$"):
        PipelineConfig.from_dict({"refine": "sometimes"})
    cfg = PipelineConfig.from_dict({"tau_verify": 1, "process_max_side": 0, "memory_interval_s": 0.5})
    assert cfg.tau_verify == 1.0 and isinstance(cfg.tau_verify, float) and cfg.process_max_side == 0
    assert {i.name for i in settings_info(PipelineConfig)} == {f.name for f in dataclasses.fields(PipelineConfig)}
