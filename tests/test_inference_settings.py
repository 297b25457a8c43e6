"""Answering with other ``model.inference.*`` settings than the run was trained with, as evaluate.py
scores with them: the Python API (runs and exports) and predict's overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from timerefine import evaluate, train
from timerefine.inference.grounder import Features, Grounder
from timerefine.inference.run_loading import dataset_examples
from timerefine.tools.export import main as export_main
from timerefine.tools.predict import main as predict_main

AUX = "model.inference.final=aux"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("settings") / "run"
    overrides = ["experiment=tiny", "trainer.max_steps=6", "trainer.val_check_interval=6"]
    assert train.main([*overrides, f"output_dir={run}"]) == 0
    return run


def test_the_api_answers_as_evaluate_scores_with_the_same_settings(run_dir, tmp_path):
    """Before: evaluate.py could score a run with the aux head's segment, and nothing could answer so."""
    assert evaluate.main([str(run_dir), "--name", "aux", AUX]) == 0
    lines = (run_dir / "eval" / "aux" / "predictions" / "test.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert export_main([str(run_dir), str(tmp_path / "export")]) == 0
    grounders = [
        Grounder.from_run(run_dir, overrides=[AUX]),
        Grounder.from_export(tmp_path / "export", overrides=[AUX]),
    ]
    plain = Grounder.from_run(run_dir)
    last_differs = False
    for row, (record, store) in zip(rows, dataset_examples(plain.run.cfg), strict=True):
        features = store.load(record.video_id)
        for grounder in grounders:
            answer = grounder.ground(features, record.query, duration=record.duration)[0]
            assert row["qid"] == record.qid and answer.text == row["text"]
            # the aux head's float32 regression moves by ~1e-7 between a padded batch and one query
            assert [answer.start, answer.end] == pytest.approx(row["pred"], abs=1e-5)
            assert list(answer.aux) == pytest.approx(row["pred"], abs=1e-5)
        answer = plain.ground(features, record.query, duration=record.duration)[0]
        last_differs |= [answer.start, answer.end] != pytest.approx(row["pred"], abs=1e-3)
    assert last_differs  # the setting changed the answers


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lora.enabled=true", "model.lora.enabled=true: answering can set only model.inference.* keys"),
        ("trainer.devices=2", "trainer.devices=2: answering can set only model.inference.* keys"),
        ("model.inference.final=best", "model.inference.final=best: must be one of last, aux"),
    ],
)
def test_predict_takes_inference_settings_only(run_dir, tmp_path, capsys, override, message):
    features = tmp_path / "features.npy"
    np.save(features, np.zeros((20, 64), np.float32))
    argv = [str(features), "--run", str(run_dir), "--duration", "8", "--query", "a red square", override]
    assert predict_main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1  # not the run's config.yaml's


def test_predict_answers_with_the_aux_head(run_dir, tmp_path, capsys):
    features = tmp_path / "features.npy"
    np.save(features, np.random.default_rng(0).random((20, 64), np.float32))
    argv = [str(features), "--run", str(run_dir), "--duration", "8", "--query", "a red square", "--json"]
    assert predict_main([*argv, AUX]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert [answer["start"], answer["end"]] == answer["aux"]


def test_an_override_before_the_input_is_named(run_dir, tmp_path, capsys):
    """Before: the video was named as the override ('f.npy: answering can set only ...')."""
    features = tmp_path / "features.npy"
    np.save(features, np.zeros((20, 64), np.float32))
    argv = [AUX, str(features), "--run", str(run_dir), "--duration", "8", "--query", "a red square"]
    assert predict_main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {AUX}: an override before the input; give the input first, overrides last\n"
    )


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_a_run_trained_with_cast_weights_answers_as_it_was_scored(tmp_path, precision, dtype):
    """Before (review): the API, predict and exports answered a bf16-true run with float32 weights under
    bf16 autocast (a 64-true run in float32), where evaluate.py's Trainer casts the weights: other
    answers than the run's own (the aux head's segment 0.07 s off in bf16)."""
    run, export = tmp_path / "run", tmp_path / "export"
    overrides = ["experiment=tiny", "trainer.max_steps=6", "trainer.val_check_interval=6", AUX]
    assert train.main([*overrides, f"trainer.precision={precision}", f"output_dir={run}"]) == 0
    rows = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert export_main([str(run), str(export)]) == 0
    for grounder in (Grounder.from_run(run), Grounder.from_export(export)):
        assert {parameter.dtype for parameter in grounder.run.module.parameters()} == {dtype}
        examples = dataset_examples(grounder.run.cfg)
        pairs = [
            (Features(store.load(record.video_id), record.duration), record.query)
            for record, store in examples
        ]
        answers = grounder.ground_pairs(pairs, batch_size=len(pairs))  # the batch evaluate.py scored
        assert [answer.text for answer in answers] == [row["text"] for row in rows]
        if dtype == torch.bfloat16:  # in float64, the run's batch held the durations in float32
            assert [[answer.start, answer.end] for answer in answers] == [row["pred"] for row in rows]
