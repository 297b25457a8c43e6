"""metrics.json: the numbers a run writes; files written whole or not at all."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from timerefine.pipeline.outputs import print_summary, save_config, write_metrics
from timerefine.pipeline.whole_files import write_whole


def test_metrics_json_holds_clean_numbers(tmp_path):
    logged = torch.tensor(95.2).item()  # what trainer.test returns for a float32 metric
    assert logged == 95.19999694824219
    metrics = {
        "test/mIoU": logged,
        "test/loss": float(np.float32(8.510042)),
        "prior/mIoU": 33.49952545074611,  # float64 arithmetic: kept whole
        "test/queries": 8.0,
        "global_step": 30,
        "val/mIoU": float("nan"),
    }
    text = write_metrics(metrics, tmp_path).read_text()
    assert '"test/mIoU": 95.2,' in text and '"test/loss": 8.510042,' in text
    assert json.loads(text) == {
        "global_step": 30,
        "prior/mIoU": 33.49952545074611,
        "test/loss": 8.510042,
        "test/mIoU": 95.2,
        "test/queries": 8.0,
        "val/mIoU": None,
    }


def test_the_summary_shows_and_warns_of_unparsed_answers(tmp_path, capsys):
    """Before: a run whose every answer failed to parse showed only mIoU 0.00; parse_fail was in
    metrics.json alone."""
    print_summary(
        {"test/mIoU": 0.0, "test/parse_fail": 100.0, "val/mIoU": 5.0, "val/parse_fail": 0.0}, tmp_path
    )
    out = capsys.readouterr().out
    assert "parse_fail" in out and "100.00" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 100 % of the test answers could not be parsed; each counts as IoU 0"]


def test_the_parse_warning_says_what_parsed_only_does(tmp_path, capsys):
    """Before: under parsed_only it said each unparsed answer counts as IoU 0, which that protocol
    does not do (it leaves them out of the denominator)."""
    print_summary({"test/mIoU": 2.8, "test/parse_fail": 75.0, "eval/protocol": "parsed_only"}, tmp_path)
    out = " ".join(capsys.readouterr().out.split())  # Rich wraps lines at the terminal's width
    assert "75 % of the test answers could not be parsed; each is left out of the scores" in out
    assert "IoU 0" not in out


@pytest.mark.parametrize(("protocol", "fate"), [("exact", "counts as IoU 0"), ("parsed_only", "is left out")])
def test_the_parse_warning_says_when_the_aux_head_answers(tmp_path, capsys, protocol, fate):
    """Before (review): 'each counts as IoU 0' under model.inference.final=aux, which scored them."""
    metrics = {"test/mIoU": 24.3, "test/parse_fail": 100.0, "eval/protocol": protocol}
    print_summary(metrics, tmp_path, final="aux")
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "100 % of the test answers could not be parsed; model.inference.final=aux answers those that "
        f"reached an <OFFSET>; each other {fate}"
    ) in out


def test_the_run_directory_is_printed_verbatim(tmp_path, capsys):
    """Before: Rich read ``[model.refine.steps=2]`` (an ablation variant's folder) as markup and
    printed a folder that does not exist."""
    output_dir = (
        tmp_path
        / "K[model.refine.steps=2]"
        / "a_very_long_folder_name_that_a_narrow_terminal_would_wrap"
        / "seed0"
    )
    print_summary({"test/mIoU": 50.0}, output_dir)
    assert f"run directory: {output_dir.resolve()}" in capsys.readouterr().out.splitlines()


def test_a_failed_whole_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    """Before: save_config left its partial file when stopped between writing and renaming."""
    target = tmp_path / "meta.json"
    write_whole(target, "old")
    write_whole(target, b"new")
    assert target.read_text() == "new"

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_whole(target, "newer")
    with pytest.raises(KeyboardInterrupt):
        save_config(OmegaConf.create({"seed": 1}), tmp_path)
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
