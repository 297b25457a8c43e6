"""A checkpoint's token ids mean the tokens of the tokenizer it carries: a resumed run continues with
it, and evaluation, inference and a run started from another refuse a checkpoint of another tokenizer
(a local BPE trained on other annotations) in one line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import evaluate
import train
from lightning_modules.tokenizer import folder_files, same_tokenizer, tokenizer_files, tokenizer_from_files
from tests.helpers import tokenizer
from timerefine.inference.run_loading import load_run
from timerefine.inference.video_features import InputError

SENTENCES = ("a person opens a door.", "someone sits on a chair.", "person holds a cup.")
EDITED = "a woman juggles seven bright oranges quickly."  # the tester's one edited sentence


def write_data(root: Path, sentences: tuple[str, ...] = SENTENCES) -> Path:
    """Train, val and test JSONL files of 20-s videos, each with every sentence once."""
    root.mkdir()
    for split, videos in (("train", 4), ("val", 2), ("test", 2)):
        entries = [
            {
                "qid": f"{split}{v}-{i}",
                "query": s,
                "video_id": f"{split}{v}",
                "duration": 20.0,
                "windows": [[2.0, 8.0]],
            }
            for v in range(videos)
            for i, s in enumerate(sentences)
        ]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root


def overrides(root: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "data=jsonl",
        f"data.source.root={root}",
        "data.source.features=synthetic",
        "data.source.feature_dim=16",
        "data.source.num_frames=8",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "model.lm.tiny.hidden_size=32",
        "model.lm.tiny.num_layers=1",
        "model.lm.tiny.num_heads=2",
        "model.lm.tiny.intermediate_size=64",
        "model.lm.tokenizer_vocab_size=300",
        "model.saliency.projector_steps=0",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.progress_bar=none",
        "logger.csv=false",
        "logger.tensorboard=false",
        "test=false",
        f"output_dir={output_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two runs of one config but their annotations' root, which differ in one sentence."""
    folder = tmp_path_factory.mktemp("tokenizers")
    trained = []
    for name, sentences in (("a", SENTENCES), ("b", (EDITED, *SENTENCES[1:]))):
        root = write_data(folder / f"data_{name}", sentences)
        assert train.main(overrides(root, folder / name)) == 0
        trained.append(folder / name)
    assert not same_tokenizer(folder_files(trained[0] / "tokenizer"), saved_tokenizer(trained[1]))
    return trained[0], trained[1]


def saved_tokenizer(run: Path):
    return tokenizer_from_files(folder_files(run / "tokenizer"), "kept")


def root_of(run: Path) -> Path:
    return run.parent / f"data_{run.name}"


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_one_tokenizer_however_written_is_the_same_and_another_is_not(runs):
    """Token ids are compared by what they mean: loading metadata and the layout a tokenizers release
    writes (merges as "a b" strings, before 0.20) change nothing."""
    files = tokenizer_files(tokenizer())
    config = json.loads(files["tokenizer_config.json"]) | {"is_local": True}
    saved = json.loads(files["tokenizer.json"])
    saved["model"] = {k: v for k, v in saved["model"].items() if k != "ignore_merges"} | {
        "merges": [" ".join(pair) for pair in saved["model"]["merges"]]
    }
    rewritten = files | {
        "tokenizer_config.json": json.dumps(config).encode(),
        "tokenizer.json": json.dumps(saved).encode(),
    }
    assert same_tokenizer(rewritten, tokenizer())
    assert not same_tokenizer(files, saved_tokenizer(runs[0]))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["tokenizer deleted", "new folder"])
def test_a_resume_without_the_runs_tokenizer_continues_with_the_checkpoints(runs, tmp_path, caplog, where):
    """Before: a tokenizer was trained anew from the annotations as they are now (one sentence edited):
    same size, other token ids, exit 0 and that tokenizer saved into the run."""
    run, folder = runs[0], tmp_path / "run"
    resume = []
    if where == "new folder":  # another run's checkpoint, continued in a folder of its own
        resume = [f"resume={run / 'checkpoints' / 'last.ckpt'}"]
    else:
        shutil.copytree(run, folder, ignore=shutil.ignore_patterns("tokenizer"))
    train_file = root_of(run) / "train.jsonl"
    original = train_file.read_text()
    train_file.write_text(original.replace(SENTENCES[0], EDITED))
    try:
        with caplog.at_level(logging.INFO):
            assert train.main(overrides(root_of(run), folder, "trainer.max_steps=3", *resume)) == 0
    finally:
        train_file.write_text(original)
    assert same_tokenizer(folder_files(folder / "tokenizer"), saved_tokenizer(run))
    last = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert same_tokenizer(last["tokenizer_files"], saved_tokenizer(run))
    assert f"{folder / 'tokenizer'}: missing; restored from the tokenizer" in caplog.text


@pytest.mark.slow
def test_a_resume_beside_another_tokenizer_is_refused_before_writing(runs, tmp_path, capsys):
    run, other = runs
    folder = tmp_path / "run"
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("tokenizer"))
    shutil.copytree(other / "tokenizer", folder / "tokenizer")
    written = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train.main(overrides(root_of(run), folder, "trainer.max_steps=3")) == 2
    line = one_error_line(capsys)
    assert f"{folder / 'checkpoints' / 'last.ckpt'} was trained with another tokenizer than" in line
    assert str(folder / "tokenizer") in line
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == written


@pytest.mark.slow
def test_another_runs_checkpoint_of_another_tokenizer_is_refused_where_it_loads(runs, tmp_path, capsys):
    """Before: evaluate.py scored run b's checkpoint with run a's tokenizer, exit 0."""
    run, other = runs
    ckpt = other / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert evaluate.main([str(run), "--ckpt", str(ckpt), "--name", "other"]) == 2
    reason = f"{ckpt} was trained with another tokenizer than {run / 'tokenizer'}"
    assert one_error_line(capsys).startswith(f"error: {reason}")
    assert not (run / "eval" / "other").exists()
    with pytest.raises(InputError, match="was trained with another tokenizer than"):
        load_run(run, str(ckpt))  # predict, export, the Python API


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_dir", ["missing", "another run's"])
def test_a_run_started_from_another_without_its_tokenizer_is_refused(runs, tmp_path, capsys, tokenizer_dir):
    """Before: with the started-from run's tokenizer folder missing, a tokenizer was trained anew on
    this run's data, and that run's token rows were loaded under it."""
    run, other = runs
    start = tmp_path / "start"
    shutil.copytree(run, start, ignore=shutil.ignore_patterns("tokenizer"))
    if tokenizer_dir == "another run's":
        shutil.copytree(other / "tokenizer", start / "tokenizer")
    capsys.readouterr()
    assert train.main(overrides(root_of(run), tmp_path / "next", f"init_from_run={start}")) == 2
    line = one_error_line(capsys)
    if tokenizer_dir == "missing":
        assert line == f"error: init_from_run={start}: {start / 'tokenizer'}: missing (the run's tokenizer)"
    else:
        assert line.startswith(f"error: init_from_run={start}: ") and "with another tokenizer than" in line
    assert not (tmp_path / "next").exists()
