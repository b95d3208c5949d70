"""python -m hqsmem_ros.tools.bench_depth accuracy: the measurement command on a short scene."""
import json

from hqsmem_ros.tools.bench_depth import main


def test_accuracy_command_reports_per_object_and_overall_errors(capsys):
    assert main(["accuracy", "--frames", "6", "--size", "320x240", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["objects"]) == {"1", "2", "3"}
    for mode in ("tracker", "truth_mask"):
        assert out[mode]["n"] == 18 and out[mode]["visible_without_position"] == 0
        assert 0 < out[mode]["median_cm"] < 3.0
    for row in out["objects"].values():
        assert 1.0 <= row["distance_m"][0] <= row["distance_m"][1] <= 4.0 and row["tracker_iou"] > 0.5


def test_bad_arguments_exit_2(capsys):
    assert main(["accuracy", "--frames", "1"]) == 2
    assert "--frames must be >= 2" in capsys.readouterr().err
