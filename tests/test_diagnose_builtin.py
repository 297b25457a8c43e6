"""timerefine/tools/diagnose_builtin.py: which event a prediction landed on."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from datamodules.builtin import BuiltinEvent, BuiltinSpec, builtin_records
from grounding.answer_format.timeline import UNIFORM99, VTIMELLM100
from timerefine.tools.diagnose_actions import boundary_errors
from timerefine.tools.diagnose_builtin import diagnose, landing, main, refinement_trace
from timerefine.tools.run_diagnosis import AnswerLayout, answer_layout

EVENTS = (BuiltinEvent(0, 0, 10.0, 20.0), BuiltinEvent(0, 5, 30.0, 40.0), BuiltinEvent(3, 0, 50.0, 55.0))
SPEC = BuiltinSpec(num_train=4, num_val=2, num_test=6, num_frames=20, feature_dim=8, queries_per_video=2)


@pytest.mark.parametrize(
    ("pred", "outcome"),
    [
        ([11.0, 19.0], "queried"),
        ([8.0, 32.0], "queried"),  # overlaps two events, the queried one most
        ([31.0, 39.0], "distractor: same verb"),
        ([50.0, 56.0], "distractor: same object"),
        ([21.0, 29.0], "nothing"),
        (None, "unparsed"),
    ],
)
def test_landing(pred, outcome):
    assert landing(pred, EVENTS) == outcome


def test_landing_follows_the_queried_event():
    assert landing([31.0, 39.0], EVENTS, queried=1) == "queried"
    assert landing([11.0, 19.0], EVENTS, queried=1) == "distractor: same verb"
    assert landing([50.0, 56.0], EVENTS, queried=2) == "queried"


def test_landing_on_an_unrelated_distractor():
    assert landing([1.0, 2.0], (BuiltinEvent(0, 0, 5, 6), BuiltinEvent(1, 1, 1, 2))) == "distractor: other"


def test_a_point_prediction_lands_on_the_same_point_as_the_metric_scores_it():
    """One IoU (grounding/metrics/windows.py): two equal points overlap fully (IoU 1), as in the run's mIoU."""
    assert landing([5.0, 5.0], (BuiltinEvent(0, 0, 5.0, 5.0),)) == "queried"
    assert landing([5.0, 5.0], (BuiltinEvent(0, 0, 6.0, 6.0),)) == "nothing"


def prediction_rows(shift: float) -> list[dict]:
    """A prediction per test query (every video is queried twice), ``shift`` seconds off the truth."""
    rows = []
    for record in builtin_records(SPEC, "test"):
        pred = [record.start + shift, record.end + shift]
        iou = 1.0 if not shift else 0.0
        gt = [record.start, record.end]
        rows.append({"qid": record.qid, "video_id": record.video_id, "pred": pred, "gt": gt, "iou": iou})
    return rows


def test_diagnose_counts_every_query():
    rows = prediction_rows(0.0)
    assert len(rows) == 2 * SPEC.num_test
    table = diagnose(rows, SPEC)
    assert table["queried"] == (len(rows), 100.0)
    assert sum(count for count, _ in table.values()) == len(rows)
    far = diagnose(prediction_rows(1000.0), SPEC)
    assert far["nothing"] == (len(rows), 0.0)


def test_main_reads_a_run_directory(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    OmegaConf.save({"data": {"name": "builtin", "source": vars(SPEC)}}, tmp_path / "config.yaml")
    (tmp_path / "predictions").mkdir()
    rows = prediction_rows(0.0)
    (tmp_path / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(tmp_path)]) == 0
    assert re.search(r"^queried\s+100\.0\s+100\.0$", capsys.readouterr().out, re.MULTILINE)
    OmegaConf.save({"data": {"name": "charades_sta", "source": {}}}, tmp_path / "config.yaml")
    assert main([str(tmp_path)]) == 2


def test_refinement_trace_measures_each_step_in_frame_indices():
    # 99 s videos: one second is one frame index.
    rows = [
        {"duration": 99.0, "gt": [10.0, 20.0], "steps": [[0.0, 30.0], [12.0, 20.0], [10.0, 20.0]]},
        {"duration": 99.0, "gt": [50.0, 60.0], "steps": [[40.0, 60.0], [50.0, 62.0], [50.0, 62.5]]},
        {"duration": 99.0, "gt": [50.0, 60.0], "steps": [[40.0, 60.0]]},  # truncated: not traced
    ]
    errors, moved = refinement_trace(rows, AnswerLayout(None, UNIFORM99))
    assert errors == pytest.approx([(10 + 10 + 10 + 0) / 4, (2 + 0 + 0 + 2) / 4, (0 + 0 + 0 + 2.5) / 4])
    assert moved == 50.0  # the first row's final answer moved 2 frames; the second's only half a frame


def test_the_trace_reads_the_run_timeline_and_depth():
    """Before: frame indices were seconds x 99 / duration on a vtimellm100 run too (1 % low), and with
    answers parsed only part-way the deepest answer seen set the steps, so a K=3 run's first refined
    step was labelled final."""
    config = OmegaConf.create({"model": {"refine": {"steps": 3}}, "data": {"timeline": "vtimellm100"}})
    layout = answer_layout(config)
    assert layout == AnswerLayout(5, VTIMELLM100)
    full = {
        "duration": 100.0,
        "gt": [10.0, 20.0],
        "pred": [10.0, 20.0],
        "steps": [[0.0, 30.0]] + [[10.0, 20.0]] * 4,
    }
    partial = full | {"steps": [[40.0, 60.0], [40.0, 60.0]]}  # parsing stopped after round 1
    errors, _ = refinement_trace([full, partial], layout)
    assert errors == pytest.approx([10.0, 0.0, 0.0, 0.0, 0.0])  # 10 s of 100 is 10 indices of 100
    assert refinement_trace([partial], layout) is None
    assert boundary_errors([full, partial], layout) == pytest.approx((10.0, 0.0, 0.0, 0.0, 0.0))
    assert answer_layout(OmegaConf.create({"data": {}})) == AnswerLayout(None, UNIFORM99)


def test_main_traces_the_steps_of_a_refinement_run(tmp_path, capsys):
    OmegaConf.save({"data": {"name": "builtin", "source": vars(SPEC)}}, tmp_path / "config.yaml")
    (tmp_path / "predictions").mkdir()
    rows = [
        row | {"duration": 50.0, "gt": row["pred"], "steps": [row["pred"], row["pred"]]}
        for row in prediction_rows(0.0)
    ]
    (tmp_path / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "coarse -> final): 0.00 -> 0.00" in out
    assert "differs from the first refined one: 0.0 %" in out


def test_predictions_of_other_built_in_data_are_refused(tmp_path, capsys):
    """Before: another run's predictions (``data.source.seed=7``: the same qids ask other queries)
    were diagnosed against this run's events, exit 0."""
    OmegaConf.save(
        {"data": {"name": "builtin", "source": vars(SPEC) | {"seed": 7}}}, tmp_path / "config.yaml"
    )
    (tmp_path / "predictions").mkdir()
    rows = prediction_rows(0.0)
    (tmp_path / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "not the test predictions of this built-in run" in line and rows[0]["qid"] in line, line


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        ("", "no prediction rows"),  # was: a report of 0 queries, exit 0
        ('{"qid": "jsonl_q1", "pred": [1, 2], "gt": [1, 3], "duration": 9}\n', "not the test predictions"),
        ("not json\n", "test.jsonl:1: not JSON (Expecting value)"),
        ('{"qid": "a"}\n\n{"qid": oops}\n', "test.jsonl:3: not JSON (Expecting value)"),  # was: line 1
        ("[1, 2]\n", "test.jsonl:1: not a JSON object"),
        ('{"qid": "a", "qid": "b"}\n', "test.jsonl:1: key 'qid' appears twice"),
    ],
)
def test_predictions_it_cannot_diagnose_are_one_line(tmp_path, capsys, predictions, message):
    """Before: a ValueError traceback (rows of a JSONL run), or an empty report."""
    OmegaConf.save({"data": {"name": "builtin", "source": vars(SPEC)}}, tmp_path / "config.yaml")
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "test.jsonl").write_text(predictions)
    assert main([str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
