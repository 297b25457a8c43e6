"""An export that is not what was exported (weights damaged, config.yaml edited) is refused in one line,
as a run's checkpoint is; a folder's kind is named when the other is expected."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from timerefine.evaluate import main as evaluate_main
from timerefine.inference.export_folder import WEIGHTS
from timerefine.inference.grounder import Grounder
from timerefine.inference.video_features import InputError
from timerefine.tools.export import main as export_main
from timerefine.tools.predict import main as predict_main

pytestmark = pytest.mark.slow
QUERY = "a red square appears"


@pytest.fixture
def export(video_run, tmp_path, capsys) -> Path:
    assert export_main([str(video_run.run_dir), str(tmp_path / "export")]) == 0
    capsys.readouterr()
    return tmp_path / "export"


def rewrite_weights(
    export: Path, edit: Callable[[dict[str, torch.Tensor]], None], recorded: bool = True
) -> None:
    """Apply ``edit`` to the export's tensors; ``recorded=False`` drops the recorded config, as an export
    written before exports recorded it."""
    with safe_open(export / WEIGHTS, "pt") as weights:
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (not iterable)
        metadata = weights.metadata()
    edit(tensors)
    save_file(tensors, export / WEIGHTS, metadata if recorded else None)


def edit_config(export: Path, key: str, value: object) -> None:
    cfg = OmegaConf.load(export / "config.yaml")
    OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, export / "config.yaml")


def predict_error(video_run, export: Path, capsys) -> str:
    """predict.py --run ``export``'s one error line (exit 2)."""
    video = video_run.videos / "vid_red_a.mp4"
    assert predict_main([str(video), "--run", str(export), "--query", QUERY]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_nonfinite_export_weights_are_refused(video_run, export, capsys):
    """Before: loaded and answered ``"start": 0.0, "end": 0.0, "aux": [NaN, NaN]``, exit 0."""
    name = next(n for n in safe_open(export / WEIGHTS, "pt").keys() if n.startswith("model.aux_head."))  # noqa: SIM118
    rewrite_weights(export, lambda tensors: tensors[name].fill_(float("nan")))
    expected = f"{export / WEIGHTS}: {name} holds NaN or infinite values (a diverged or damaged export)"
    assert predict_error(video_run, export, capsys) == f"error: {expected}"
    with pytest.raises(InputError, match="NaN or infinite"):
        Grounder.from_export(export)


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.refine.steps", 1), ("data.timeline", "vtimellm100"), ("data.source.num_frames", 8)],
)
def test_an_edited_export_config_is_refused(video_run, export, capsys, key, value):
    """Before: the edited config silently decoded another model (or, for a shape, a traceback)."""
    trained = OmegaConf.select(OmegaConf.load(export / "config.yaml"), key)
    edit_config(export, key, value)
    line = predict_error(video_run, export, capsys)
    assert line.startswith(f"error: {export / 'config.yaml'}: not the config {WEIGHTS} was exported with: ")
    assert line.endswith(f"{key}: what the run was trained as cannot change (trained with {key}={trained})")


def test_an_export_config_may_change_how_answers_are_chosen(video_run, export, capsys):
    edit_config(export, "model.inference.final", "aux")
    video = video_run.videos / "vid_red_a.mp4"
    assert predict_main([str(video), "--run", str(export), "--query", QUERY, "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert [answer["start"], answer["end"]] == answer["aux"]


@pytest.mark.parametrize(("key", "value"), [("model.lm.tiny.hidden_size", 64), ("data.source.num_frames", 8)])
def test_an_older_export_with_a_reshaped_config_is_one_line(video_run, export, capsys, key, value):
    """An export that records no config still loads; one whose config.yaml changes a tensor's shape
    names it. Before: ``RuntimeError: Error(s) in loading state_dict ... size mismatch`` traceback."""
    rewrite_weights(export, lambda tensors: None, recorded=False)
    video = video_run.videos / "vid_red_a.mp4"
    assert predict_main([str(video), "--run", str(export), "--query", QUERY]) == 0
    capsys.readouterr()
    edit_config(export, key, value)
    line = predict_error(video_run, export, capsys)
    assert line.startswith(f"error: {export / WEIGHTS}: ") and " has shape (" in line, line
    assert ", this run's model needs (" in line


def test_an_export_given_where_a_run_is_expected_says_so(export, tmp_path, capsys):
    """Before: ``no checkpoint in <export>/checkpoints``."""
    expected = (
        f"error: {export}: an exported model (export.json), not a run, so it has no checkpoints; "
        f"use it with predict.py --run {export} or Grounder.from_export"
    )
    assert evaluate_main([str(export)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert export_main([str(export), str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err.strip() == expected
    with pytest.raises(InputError, match="an exported model"):
        Grounder.from_run(export)


def test_the_export_records_its_checkpoint_wherever_it_was_run_from(video_run, tmp_path, monkeypatch, capsys):
    """Before: ``run/checkpoints/best-step3.ckpt``, relative to the caller's working directory."""
    monkeypatch.chdir(video_run.run_dir.parent)
    assert export_main([video_run.run_dir.name, str(tmp_path / "export")]) == 0
    checkpoint = Path(json.loads((tmp_path / "export" / "export.json").read_text())["checkpoint"])
    assert checkpoint.is_absolute() and checkpoint.parent == video_run.run_dir.resolve() / "checkpoints"
