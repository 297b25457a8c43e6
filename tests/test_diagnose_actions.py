"""timerefine/tools/diagnose_actions.py: which annotated action each prediction of a Charades-STA run
landed on, and each step's boundary error by the moment's length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grounding.action_timelines import Action, read_timelines
from grounding.answer_format.timeline import UNIFORM99
from tests.charades_folder import TEST_ROWS, write_charades
from timerefine.tools.diagnose_actions import (
    NOTHING,
    RIGHT_BAD,
    RIGHT_GOOD,
    UNPARSED,
    WRONG,
    by_moment_length,
    diagnose,
    landing,
    main,
)
from timerefine.tools.run_diagnosis import AnswerLayout


@pytest.fixture
def charades(tmp_path: Path) -> Path:
    return write_charades(tmp_path)


ACTIONS = (Action(1, 0.0, 10.0), Action(2, 12.0, 20.0), Action(3, 0.0, 10.0), Action(4, 2.0, 6.0))


@pytest.mark.parametrize(
    ("pred", "outcome"),
    [
        ((1.0, 9.0), RIGHT_GOOD),
        ((0.0, 4.0), RIGHT_BAD),  # IoU 0.4 with [0, 10] (the truth, and c003's interval), 0.33 with [2, 6]
        ((2.5, 6.0), WRONG),
        ((11.0, 21.0), WRONG),
        ((10.5, 11.5), NOTHING),
        (None, UNPARSED),
    ],
)
def test_landing(pred, outcome):
    assert landing(pred, (0.0, 10.0), ACTIONS) == outcome
    assert landing((1.0, 9.0), (0.0, 10.0), ()) == NOTHING


NEAR_TWINS = (Action(1, 0.0, 10.0), Action(2, 0.0, 9.0), Action(3, 20.0, 30.0))


@pytest.mark.parametrize(
    ("pred", "outcome"),
    [
        ((0.0, 8.9), RIGHT_GOOD),  # closer to [0, 9] than to the truth, yet an R1@0.5 hit
        ((0.0, 4.0), RIGHT_BAD),  # IoU 0.4 with the truth, 0.44 with [0, 9], which is the truth's place
        ((21.0, 29.0), WRONG),
    ],
)
def test_an_action_near_the_truth_is_not_another_event(pred, outcome):
    assert landing(pred, (0.0, 10.0), NEAR_TWINS) == outcome


def test_diagnose_and_the_tool(charades, tmp_path, capsys):
    timelines = read_timelines([charades / "Charades_v1_test.csv"])
    rows = [
        {"video_id": "VIDB1", "gt": [3.0, 11.0], "pred": [3.0, 11.0], "iou": 1.0},
        {"video_id": "VIDB1", "gt": [15.0, 29.0], "pred": [3.5, 10.0], "iou": 0.0},
        {"video_id": "VIDB2", "gt": [0.0, 8.0], "pred": [0.0, 2.0], "iou": 0.25},
        {"video_id": "VIDB2", "gt": [0.0, 8.0], "pred": None, "iou": 0.0},
    ]
    assert diagnose(rows, timelines) == {
        RIGHT_GOOD: (1, 100.0),
        RIGHT_BAD: (1, 25.0),
        WRONG: (1, 0.0),
        NOTHING: (0, 0.0),
        UNPARSED: (1, 0.0),
    }
    rows = [row | {"duration": TEST_ROWS[row["video_id"]][1]} for row in rows]
    rows[0]["steps"], rows[2]["steps"] = [[1.0, 11.0], [3.0, 11.0]], [[0.0, 6.0], [0.0, 2.0]]
    middle, long = by_moment_length(
        rows, timelines, AnswerLayout(None, UNIFORM99)
    )  # 8 / 29 of VIDB1; 14 / 29, 8 / 19, 8 / 19
    assert (middle.low, middle.high, middle.queries, middle.miou, middle.right_action) == (
        0.2,
        0.4,
        1,
        100,
        100,
    )
    assert middle.boundary_error == pytest.approx((99 / 29, 0.0))  # coarse: the start 2 s off
    assert (long.queries, long.miou, long.right_action) == pytest.approx((3, 25 / 3, 100 / 3))
    assert long.boundary_error == pytest.approx((99 / 19, 3 * 99 / 19))  # refined further off: 6 s
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    (run / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    OmegaConf.save({"data": {"name": "charades_sta", "source": {"root": str(charades)}}}, run / "config.yaml")
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "another action" in out and "25.0" in out
    assert "by the moment's length" in out and "40%-100%" in out
    OmegaConf.save({"data": {"name": "builtin", "source": {}}}, run / "config.yaml")
    assert main([str(run)]) == 2
    OmegaConf.save(
        {"data": {"name": "charades_sta", "source": {"root": str(tmp_path / "no")}}}, run / "config.yaml"
    )
    assert main([str(run)]) == 2
    assert "Charades_v1_train.csv" in capsys.readouterr().err
    assert main([str(run), "--root", str(charades)]) == 0  # a root moved, or relative to another folder


def test_a_prediction_of_a_video_in_no_csv_is_refused(charades, tmp_path, capsys):
    """Before: counted as "no action", as if the model had answered off every action."""
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    row = {"video_id": "ELSEWHERE", "gt": [0.0, 8.0], "pred": [0.0, 8.0], "iou": 1.0, "duration": 19.0}
    (run / "predictions" / "test.jsonl").write_text(json.dumps(row) + "\n")
    OmegaConf.save({"data": {"name": "charades_sta", "source": {"root": str(charades)}}}, run / "config.yaml")
    assert main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "video ELSEWHERE" in err and "Charades_v1_test.csv" in err, err
