"""Scoring protocols against hand-computed values, the metric under each, and rescoring saved predictions."""

from __future__ import annotations

import json
import logging
import math
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
import torch

from grounding.metrics.grounding import GroundingMetric
from grounding.metrics.protocols import PROTOCOLS, protocol_iou, protocol_named, round_half_up
from tests import launched
from timerefine.pipeline.config import load_config
from timerefine.pipeline.conventions import recorded_conventions, run_protocol
from timerefine.pipeline.outputs import print_summary
from timerefine.tools.rescore import main as rescore_main
from timerefine.tools.rescore import rescore

NAN = math.nan


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def scores(protocol: str, pred, gt, duration) -> dict[str, float]:
    metric = GroundingMetric(protocol=protocol_named(protocol))
    metric.update(tensor(pred), tensor(gt), tensor(duration))
    return metric.compute()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.695, 0.70),  # Python's round(0.695, 2) gives 0.69: 0.695 is 0.69499999... in binary
        (0.685, 0.69),
        (0.705, 0.71),
        (0.6949999999999999, 0.70),  # float noise of a computed 0.695
        (0.694, 0.69),
        (0.3, 0.30),
        (0.0, 0.0),
        (1.0, 1.0),
    ],
)
def test_round_half_up_is_decimal_half_up(value, expected):
    assert round(0.695, 2) == 0.69  # the pitfall this avoids
    assert float(round_half_up(tensor([value]), 2)[0]) == expected


def test_vtimellm_counts_0695_at_07():
    """IoU 0.695 on fractions of the duration: below 0.7 exactly, 0.70 after rounding."""
    pred, gt, duration = [[0.0, 100.0]], [[0.0, 69.5]], [100.0]
    exact, vtimellm = scores("exact", pred, gt, duration), scores("vtimellm", pred, gt, duration)
    assert exact["R1@0.7"] == 0.0 and exact["mIoU"] == pytest.approx(69.5)
    assert vtimellm["R1@0.7"] == 100.0 and vtimellm["mIoU"] == pytest.approx(70.0)


def test_vtimellm_iou_is_on_fractions_and_rounded():
    # 10/30 of the video against [0, 1/3]: IoU 1/3 -> 0.33 (0.3333 unrounded).
    iou = protocol_iou(tensor([[0.0, 10.0]]), tensor([[0.0, 3.3333]]), tensor([10.0]), PROTOCOLS["vtimellm"])
    assert float(iou[0]) == 0.33


@pytest.mark.parametrize(("protocol", "hit"), [("exact", 100.0), ("strict", 0.0), ("vtimellm", 100.0)])
def test_a_tie_counts_under_ge_but_not_under_gt(protocol, hit):
    """IoU exactly 0.5 (and 0.3): ``>=`` counts it, ``>`` (strict) does not."""
    at_half = scores(protocol, [[0.0, 10.0]], [[0.0, 5.0]], [20.0])
    assert at_half["R1@0.5"] == hit and at_half["R1@0.3"] == 100.0 and at_half["R1@0.7"] == 0.0
    assert scores(protocol, [[0.0, 10.0]], [[0.0, 3.0]], [20.0])["R1@0.3"] == hit
    # a tie in exact arithmetic that floats put below: 7.7 / 15.4 computes as 0.49999999999999994
    assert scores(protocol, [[0.0, 12.6]], [[4.9, 15.4]], [56.7])["R1@0.5"] == hit


# Four queries: IoU 1, 0.5 (a tie at 0.5), 0.695 (0.7 after rounding), and an unparseable answer.
PRED = [[2.0, 4.0], [0.0, 10.0], [0.0, 100.0], [NAN, NAN]]
GT = [[2.0, 4.0], [0.0, 5.0], [0.0, 69.5], [1.0, 2.0]]
DURATION = [10.0, 20.0, 100.0, 10.0]
EXPECTED = {  # (R1@0.3, R1@0.5, R1@0.7, mIoU, parse_fail), hand-computed
    "exact": (75.0, 75.0, 25.0, (1 + 0.5 + 0.695) / 4 * 100, 25.0),
    "vtimellm": (75.0, 75.0, 50.0, (1 + 0.5 + 0.70) / 4 * 100, 25.0),
    "strict": (75.0, 50.0, 25.0, (1 + 0.5 + 0.695) / 4 * 100, 25.0),
    "parsed_only": (100.0, 100.0, 100 / 3, (1 + 0.5 + 0.695) / 3 * 100, 25.0),
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_each_protocol_hand_computed_with_an_unparseable_answer(protocol):
    result = scores(protocol, PRED, GT, DURATION)
    got = tuple(result[k] for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "parse_fail"))
    assert got == pytest.approx(EXPECTED[protocol])
    assert result["count"] == 4


def test_exact_is_the_default_and_needs_no_durations():
    metric = GroundingMetric()
    metric.update(tensor(PRED), tensor(GT))
    assert metric.protocol.name == "exact"
    assert metric.compute()["mIoU"] == pytest.approx(EXPECTED["exact"][3])
    with pytest.raises(ValueError, match="pass the durations"):
        GroundingMetric(protocol=PROTOCOLS["vtimellm"]).update(tensor(PRED), tensor(GT))


def test_only_parsed_only_warns():
    assert [name for name, p in PROTOCOLS.items() if p.warning] == ["parsed_only"]
    assert "inflated" in PROTOCOLS["parsed_only"].warning
    with pytest.raises(ValueError, match="choose from exact, vtimellm, strict, parsed_only"):
        protocol_named("trace")


# ---- rescoring a saved predictions file --------------------------------------------------------------


def independent_scores(rows: list[dict], protocol: str) -> dict[str, float]:
    """Plain-Python scoring written from the protocol definitions, in decimal arithmetic on the numbers
    as the file writes them (so a tie is a tie), with Decimal rounding of IoUs snapped to 1e-9 (an IoU
    of 0.695 * 30 s over 30 s, 20.849999999999998 / 30, rounds as 0.695)."""
    ious, parsed = [], 0
    for row in rows:
        if row["pred"] is None:
            ious.append(Decimal(0))
            continue
        parsed += 1
        (ps, pe), (gs, ge), d = (
            [Decimal(repr(v)) for v in row["pred"]],
            [Decimal(repr(v)) for v in row["gt"]],
            Decimal(repr(row["duration"])),
        )
        if protocol == "vtimellm":
            ps, pe, gs, ge = ps / d, pe / d, gs / d, ge / d
        inter, union = max(Decimal(0), min(pe, ge) - max(ps, gs)), max(pe, ge) - min(ps, gs)
        iou = inter / union if union > 0 else Decimal(ps == gs and pe == ge)
        if protocol == "vtimellm":
            iou = Decimal(f"{iou:.9f}").quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)  # 0.6949999999..
        ious.append(iou)
    denominator = parsed if protocol == "parsed_only" else len(rows)
    counts = (lambda i, t: i > t) if protocol == "strict" else (lambda i, t: i >= t)
    result = {
        f"R1@{t}": 100 * sum(counts(i, Decimal(t)) for i in ious) / denominator for t in ("0.3", "0.5", "0.7")
    }
    return {
        **result,
        "mIoU": 100 * float(sum(ious)) / denominator,
        "parse_fail": 100 * (len(rows) - parsed) / len(rows),
    }


def write_predictions(path: Path, count: int = 3720, seed: int = 0) -> list[dict]:
    """Rows like a run's predictions file: index answers read as seconds, some unparseable, some ties."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        duration = rng.choice([30.0, 31.3, 100.0, 17.25])
        gs = rng.uniform(0, duration * 0.7)
        gt = [round(gs, 2), round(min(duration, gs + rng.uniform(0.5, duration * 0.3)), 2)]
        index = sorted(rng.randrange(100) for _ in range(2))
        pred = None if i % 17 == 0 else [index[0] / 100 * duration, index[1] / 100 * duration]
        if i % 23 == 0:  # ties: IoU exactly 0.5 and 0.695
            pred, gt = ([0.0, 10.0], [0.0, 5.0]) if i % 2 else ([0.0, duration], [0.0, 0.695 * duration])
        rows.append({"qid": f"q{i}", "duration": duration, "gt": gt, "pred": pred, "text": "..."})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_rescore_agrees_with_an_independent_computation(tmp_path, protocol):
    path = tmp_path / "test.jsonl"
    rows = write_predictions(path)
    got = rescore(path, PROTOCOLS[protocol])
    expected = independent_scores(rows, protocol)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["queries"] == len(rows) and got["protocol"] == protocol


def test_rescore_cli_prints_one_json_object(tmp_path, capsys):
    path = tmp_path / "test.jsonl"
    write_predictions(path, count=50)
    assert rescore_main([str(path), "--protocol", "parsed_only"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert set(result) == {
        "R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "queries", "parse_fail",
        "pred_reordered", "pred_clipped", "multi_window", "protocol",
    }  # fmt: skip
    assert result["protocol"] == "parsed_only" and "inflated" in err
    assert result["pred_reordered"] == result["pred_clipped"] == 0 and result["multi_window"] is None


def test_rescore_console_script_runs(tmp_path):
    path = tmp_path / "test.jsonl"
    write_predictions(path, count=20)
    result = launched.fresh(
        ["-m", "timerefine.tools.rescore", str(path), "--protocol", "vtimellm"], timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["protocol"] == "vtimellm"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ('{"pred": [1, 2], "gt": [1, 2], "duration": 3}\nnot json\n', "test.jsonl:2: not JSON"),
        ('{"pred": [1, 2], "duration": 3}\n', "test.jsonl:1: needs pred, gt and duration"),
        ('{"pred": [1, 2], "gt": [1, 2], "duration": 0}\n', "duration must be a finite number > 0, got 0"),
        ("\n", "no prediction rows"),
        # each was scored before: a string, a dict or bools as a segment, an infinite duration, a repeat
        (
            '{"pred": "14", "gt": [2, 5], "duration": 10}\n',
            'test.jsonl:1: pred must be [start, end], two finite numbers, got "14"',
        ),
        ('{"pred": {"1": 0, "4": 0}, "gt": [2, 5], "duration": 10}\n', "pred must be [start, end]"),
        ('{"pred": [true, false], "gt": [2, 5], "duration": 10}\n', "pred must be [start, end]"),
        ('{"pred": [1, 4], "gt": "25", "duration": 10}\n', "gt must be [start, end]"),
        ('{"pred": [NaN, 4], "gt": [2, 5], "duration": 10}\n', "pred must be [start, end]"),
        ('{"pred": [1, 4], "gt": [2, 5], "duration": Infinity}\n', "duration must be a finite number > 0"),
        ('{"pred": [1, 4], "gt": [2, 5], "duration": "10"}\n', "duration must be a finite number > 0"),
        (
            '{"qid": "a", "pred": [1, 4], "gt": [2, 5], "duration": 10}\n' * 2,
            "test.jsonl:2: qid a is scored on line 1",
        ),
        # before: the last of a repeated key scored (a parse failure here), and a decode error without a line
        (
            '{"pred": [0, 5], "gt": [2, 5], "duration": 10, "pred": null}\n',
            "test.jsonl:1: key 'pred' appears twice",
        ),
        (b'{"pred": [1, 2], "gt": [1, 2], "duration": 3}\n{"pred": "caf\xe9"}\n', "test.jsonl:2: not UTF-8"),
    ],
)
def test_rescore_bad_file_is_one_error_line(tmp_path, capsys, content, message):
    path = tmp_path / "test.jsonl"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert rescore_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TWO_WINDOWS = [[1.0, 5.0], [12.0, 18.0]]
WINDOW_ROWS = [  # best: 1, 1, 2/3; union: 4/10, 6/10, 2/3
    {"pred": [1.0, 5.0], "gt": [1.0, 5.0], "windows": TWO_WINDOWS, "duration": 20.0},
    {"pred": [12.0, 18.0], "gt": [1.0, 5.0], "windows": TWO_WINDOWS, "duration": 20.0},
    {"pred": [2.0, 8.0], "gt": [2.0, 6.0], "duration": 20.0},
]


@pytest.mark.parametrize(("mode", "ious"), [("best", (1.0, 1.0, 2 / 3)), ("union", (0.4, 0.6, 2 / 3))])
def test_rescore_scores_each_query_by_its_windows(tmp_path, mode, ious):
    recorded = [{**row, "multi_window": mode} if "windows" in row else row for row in WINDOW_ROWS]
    other = {"best": "union", "union": "best"}[mode]
    by_row = rescore(write_rows(tmp_path / "recorded.jsonl", recorded), PROTOCOLS["exact"])
    by_flag = rescore(write_rows(tmp_path / "plain.jsonl", WINDOW_ROWS), PROTOCOLS["exact"], mode)
    overridden = rescore(tmp_path / "recorded.jsonl", PROTOCOLS["exact"], other)
    for got in (by_row, by_flag):
        assert got["mIoU"] == pytest.approx(100 * sum(ious) / 3, abs=1e-9) and got["multi_window"] == mode
        assert got["R1@0.5"] == pytest.approx(100 * sum(i >= 0.5 for i in ious) / 3)
    assert overridden["multi_window"] == other and overridden["mIoU"] != pytest.approx(by_row["mIoU"])


def test_rescore_needs_the_rule_of_a_query_with_windows(tmp_path, capsys):
    path = write_rows(tmp_path / "test.jsonl", [WINDOW_ROWS[2], WINDOW_ROWS[0]])
    assert rescore_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:2: ") and "--multi-window" in err and "\n" not in err
    assert rescore_main([str(path), "--multi-window", "union"]) == 0
    assert json.loads(capsys.readouterr().out)["multi_window"] == "union"


def test_rescore_counts_an_aux_answer_to_a_text_that_did_not_parse(tmp_path):
    """A run answering with the aux head (``inference.final=aux``) writes ``steps: []`` for a text that
    did not parse and the head's segment as ``pred``: scored, and counted in parse_fail as the run does."""
    rows = [
        {"pred": [2.0, 6.0], "gt": [2.0, 6.0], "duration": 10.0, "steps": []},
        {"pred": [2.0, 6.0], "gt": [2.0, 6.0], "duration": 10.0, "steps": [[2.0, 6.0]]},
    ]
    result = rescore(write_rows(tmp_path / "test.jsonl", rows), PROTOCOLS["exact"])
    assert result["mIoU"] == 100.0 and result["parse_fail"] == 50.0


def test_rescore_orders_and_clips_predictions_as_the_run_does(tmp_path, capsys):
    """The run's answers are ordered and inside the video (grounding/answer_format/layout.py): a row
    that is not is scored as the run would score it, and counted."""
    rows = [
        {"pred": [8.0, 2.0], "gt": [2.0, 6.0], "duration": 10.0},  # reordered: [2, 8], IoU 4/6
        {"pred": [-3.0, 4.0], "gt": [0.0, 4.0], "duration": 10.0},  # clipped: [0, 4], IoU 1
        {"pred": [14.0, 6.0], "gt": [6.0, 10.0], "duration": 10.0},  # both: [6, 10], IoU 1
        {"pred": None, "gt": [6.0, 10.0], "duration": 10.0},
    ]
    path = write_rows(tmp_path / "test.jsonl", rows)
    assert rescore_main([str(path)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["mIoU"] == pytest.approx(100 * (4 / 6 + 1 + 1) / 4)
    assert result["pred_reordered"] == 2 and result["pred_clipped"] == 2 and result["parse_fail"] == 25.0
    assert err.strip() == (
        "warning: 2 predictions had start > end (scored reordered) and 2 lay outside [0, duration] "
        "(scored clipped), as a run scores its own answers with model.inference.order_and_clip=true (the "
        "default)"
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"pred": [1.0, 2.0], "gt": [5.0, 2.0], "duration": 10.0}, "ground truth [5.0, 2.0]"),
        ({"pred": [1.0, 2.0], "gt": [5.0, 12.0], "duration": 10.0}, "ground truth [5.0, 12.0]"),
        # before (review): zero length was scored IoU 0, exit 0; the datasets drop or refuse it
        ({"pred": [1.9, 2.1], "gt": [2.0, 2.0], "duration": 10.0}, "[2.0, 2.0] is not a segment of positive"),
        (
            {"pred": [1.0, 2.0], "gt": [1.0, 2.0], "windows": [[1, 2], [-1, 3]], "duration": 10.0},
            "[-1.0, 3.0]",
        ),
        ({"pred": [1.0, 2.0], "gt": [1.0, 2.0], "windows": [[1, 2], [3]], "duration": 10.0}, "[start, end]"),
        # before: scored against gt, its one window unread
        (
            {"pred": [0, 1], "gt": [0, 1], "windows": [[5, 6]], "duration": 10.0},
            "gt [0.0, 1.0] is not the query's one window [5.0, 6.0]",
        ),
        (
            {"pred": [1, 2], "gt": [1, 2], "windows": TWO_WINDOWS, "multi_window": "any", "duration": 20},
            "'any'",
        ),
    ],
)
def test_rescore_refuses_malformed_ground_truth(tmp_path, capsys, row, message):
    path = write_rows(tmp_path / "test.jsonl", [WINDOW_ROWS[2], row])
    assert rescore_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:2: ") and message in err and "\n" not in err


def test_rescore_rejects_an_unknown_protocol(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rescore_main([str(tmp_path / "x.jsonl"), "--protocol", "trace"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_parsed_only_runs_warn_in_the_log_and_the_summary(tmp_path, caplog, capsys):
    cfg = load_config(["eval.protocol=parsed_only", "output_dir=unused"])
    with caplog.at_level(logging.WARNING):
        assert run_protocol(cfg).name == "parsed_only"
    assert "inflated" in caplog.text
    print_summary({"test/mIoU": 50.0, **recorded_conventions(cfg)}, tmp_path)
    assert "warning: protocol parsed_only" in capsys.readouterr().out
    print_summary({"test/mIoU": 50.0, "eval/protocol": "exact"}, tmp_path)
    assert "warning" not in capsys.readouterr().out


def test_the_baselines_are_scored_under_the_run_protocol():
    """The prior and the best action are compared with the run's scores, so they are scored as the run
    is: an IoU of 0.695 counts at 0.7 under vtimellm (hunter: prior/mIoU stayed exact under vtimellm)."""
    from grounding.action_timelines import Action, Timeline
    from grounding.metrics.action_prior import best_action_scores
    from grounding.metrics.prior import prior_scores
    from grounding.records import GroundingRecord

    train = [GroundingRecord(f"t{i}", f"v{i}", "a query", 100.0, 0.0, 50.0) for i in range(4)]
    test = [GroundingRecord("q", "w", "a query", 100.0, 0.0, 34.75)]  # IoU 0.695 with [0, 50]
    exact, vtimellm = (prior_scores(train, test, protocol_named(p)) for p in ("exact", "vtimellm"))
    assert exact["R1@0.7"] == 0.0 and exact["mIoU"] == pytest.approx(69.5)
    assert vtimellm["R1@0.7"] == 100.0 and vtimellm["mIoU"] == pytest.approx(70.0)
    timelines = {v: Timeline(v, "train", 100.0, (Action(0, 0.0, 50.0),)) for v in ("v0", "w")}
    timelines["nowhere"] = Timeline("nowhere", "test", 100.0, ())
    test.append(GroundingRecord("n", "nowhere", "a query", 100.0, 0.0, 34.75))  # no action: IoU 0
    rounded = best_action_scores(train, test, timelines, protocol_named("vtimellm"))
    assert rounded == {"R1@0.3": 50.0, "R1@0.5": 50.0, "R1@0.7": 50.0, "mIoU": pytest.approx(35.0)}
    assert best_action_scores(train, test, timelines)["R1@0.7"] == 0.0


def test_the_baselines_are_scored_on_each_process_alone(monkeypatch):
    """Before: scored by a GroundingMetric, which syncs on compute: after a DDP test every rank
    all-gathered CPU tensors, which NCCL refuses (found by review)."""
    from grounding.metrics.grounding import segment_scores
    from grounding.records import GroundingRecord

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather", lambda *args, **kwargs: pytest.fail("synced"))
    record = GroundingRecord("q", "v", "a query", 100.0, 0.0, 50.0)
    assert segment_scores([(0.0, 25.0)], [record])["mIoU"] == pytest.approx(50.0)
