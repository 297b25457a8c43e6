"""Export -> reload: the exported folder predicts exactly as the checkpoint, without the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_modules.language_model import TinyLMSpec, build_tiny_lm
from lightning_modules.tokenizer import train_local_tokenizer
from tests import launched
from tests.helpers import corpus
from timerefine.inference.export_folder import LM_DIR, WEIGHTS
from timerefine.inference.grounder import Grounder
from timerefine.inference.video_features import InputError
from timerefine.tools.export import main as export_main
from timerefine.tools.predict import main as predict_main

pytestmark = pytest.mark.slow
QUERIES = ["a red square appears", "a green square appears", "someone opens the door"]


def answers(grounder: Grounder, video, duration: float | None = None) -> list[dict]:
    return [a.as_json() for a in grounder.ground(video, QUERIES, duration=duration)]


def assert_same_weights(a: Grounder, b: Grounder) -> None:
    """Every tensor of the two modules is equal: any decoding (free, sampled) gives the same answers."""
    state_a, state_b = a.run.module.state_dict(), b.run.module.state_dict()
    assert sorted(state_a) == sorted(state_b)
    assert [n for n in state_a if not torch.equal(state_a[n], state_b[n])] == []


def test_export_reloads_without_the_checkpoint_and_predicts_identically(video_run, tmp_path, capsys):
    assert export_main([str(video_run.run_dir), str(tmp_path / "export")]) == 0
    assert "exported" in capsys.readouterr().out
    moved = shutil.move(tmp_path / "export", tmp_path / "elsewhere")  # nothing points back at the run
    video = video_run.videos / "vid_blue_a.mp4"
    from_checkpoint = Grounder.from_run(video_run.run_dir).ground(video, QUERIES)
    exported = Grounder.from_export(moved)
    assert exported.ground(video, QUERIES) == from_checkpoint  # every float, the aux head's included
    assert_same_weights(exported, Grounder.from_run(video_run.run_dir))
    manifest = json.loads((Path(moved) / "export.json").read_text())
    assert manifest["encoder"]["model"] == str(video_run.encoder) and not manifest["merged_lora"]
    # The CLI takes the export where it takes a run.
    assert predict_main([str(video), "--run", str(moved), "--query", QUERIES[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["steps"] == from_checkpoint[0].as_json()["steps"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A tiny run with LoRA on a saved 'pretrained' base whose vocabulary lacks the grounding tokens."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = train_local_tokenizer(corpus(), 300)
    tokenizer.save_pretrained(root / "base")
    build_tiny_lm(
        TinyLMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tokenizer
    ).save_pretrained(root / "base")
    overrides = [
        "experiment=tiny",
        f"model.lm.name_or_path={root / 'base'}",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "trainer.accelerator=cpu",
        "trainer.max_steps=6",
        "model.saliency.projector_steps=0",
        "trainer.val_check_interval=3",
        "logger.csv=false",
        "logger.tensorboard=false",
        f"output_dir={root / 'run'}",
    ]
    result = launched.run(["train.py", *overrides], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "run"


def test_lora_export_holds_only_the_trained_parts(lora_run, tmp_path):
    assert export_main([str(lora_run), str(tmp_path / "export")]) == 0
    with safe_open(tmp_path / "export" / WEIGHTS, "pt") as weights:
        names = set(weights.keys())
    assert any("lora_A" in n for n in names) and any(n.startswith("model.projector.") for n in names)
    assert any(n.startswith("model.aux_head.") for n in names) and any("trainable_tokens" in n for n in names)
    assert not any("base_layer" in n and not n.endswith(".new_rows") for n in names)  # no frozen base weights
    assert sum(n.endswith(".new_rows") for n in names) >= 1  # the rows resizing drew at random
    from_checkpoint = Grounder.from_run(lora_run)
    exported = Grounder.from_export(tmp_path / "export")
    features, duration = from_checkpoint.run.cfg.data.source, 20.0
    video = np.random.default_rng(0).normal(size=(features.num_frames, features.feature_dim))
    assert answers(exported, video, duration) == answers(from_checkpoint, video, duration)
    assert_same_weights(exported, from_checkpoint)  # the new token rows of lm_head included


def test_merged_lora_export(lora_run, tmp_path):
    umask = os.umask(0o022)
    try:
        assert export_main([str(lora_run), str(tmp_path / "merged"), "--merge-lora"]) == 0
    finally:
        os.umask(umask)
    # before: weights.safetensors and lm/model.safetensors were 0600 (safetensors' writer), unshareable
    modes = {
        p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in (tmp_path / "merged").rglob("*")
    }
    assert {name: mode for name, mode in modes.items() if mode not in (0o644, 0o755)} == {}
    assert (tmp_path / "merged" / LM_DIR / "config.json").is_file()
    manifest = json.loads((tmp_path / "merged" / "export.json").read_text())
    assert manifest["merged_lora"] and manifest["language_model"] == LM_DIR
    from_checkpoint = Grounder.from_run(lora_run)
    merged = Grounder.from_export(tmp_path / "merged")
    # Merged weights differ from base + adapters by float rounding only: compare logits, not greedy
    # answers (an untrained model's near-ties may flip under rounding).
    ids = torch.randint(
        0, len(from_checkpoint.run.module.tokenizer), (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = from_checkpoint.run.module.model.lm(input_ids=ids).logits
        found = merged.run.module.model.lm(input_ids=ids).logits
    assert torch.allclose(found, expected, atol=1e-4)
    assert [n for n, _ in merged.run.module.model.lm.named_modules() if "lora" in n.lower()] == []


def test_merged_lora_export_with_nonfinite_lm_weights_is_refused(lora_run, tmp_path):
    """Before: the LM under lm/ was loaded unchecked, so a damaged one answered garbage silently."""
    assert export_main([str(lora_run), str(tmp_path / "merged"), "--merge-lora"]) == 0
    (lm_file,) = (tmp_path / "merged" / LM_DIR).glob("*.safetensors")
    with safe_open(lm_file, "pt") as weights:
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (not iterable)
        metadata = weights.metadata()
    name = next(n for n in sorted(tensors) if "mlp" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, lm_file, metadata)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'merged' / LM_DIR}: .*mlp.* holds NaN or infinite"):
        Grounder.from_export(tmp_path / "merged")


def test_export_errors(video_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert export_main([str(video_run.run_dir), str(tmp_path / "taken")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path / 'taken'}: exists and is not an export; give a new folder"
    )
    assert export_main([str(tmp_path / "taken"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'taken'}: no config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("manifest", "reason"), [("{", "not JSON (Expecting"), ("[]", "a JSON list, not")])
def test_an_earlier_export_whose_manifest_is_damaged_is_one_error_line(
    video_run, tmp_path, capsys, manifest, reason
):
    """Before (review): a JSONDecodeError or AttributeError traceback, once the export had been made."""
    out = tmp_path / "export"
    out.mkdir()
    (out / "export.json").write_text(manifest)
    assert export_main([str(video_run.run_dir), str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {out / 'export.json'}: {reason}")
    assert [path.name for path in out.iterdir()] == ["export.json"]


def test_reexport_replaces_only_its_own_files(video_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_main([str(video_run.run_dir), str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer" / "notes.txt").write_text("mine too")
    (out / WEIGHTS).write_bytes(b"stale")  # a file the export wrote is replaced
    assert export_main([str(video_run.run_dir), str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "tokenizer" / "notes.txt").read_text() == "mine too"
    video = video_run.videos / "vid_blue_a.mp4"
    assert Grounder.from_export(out).ground(video, QUERIES) == Grounder.from_run(video_run.run_dir).ground(
        video, QUERIES
    )
    assert "notes.txt" not in json.loads((out / "export.json").read_text())["files"]


def test_export_to_a_file_is_one_error_line(video_run, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_text("mine")
    assert export_main([str(video_run.run_dir), str(target)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {target}: is a file, not a folder; give a folder"
    assert target.read_text() == "mine"
    assert export_main([str(video_run.run_dir), str(target / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {target / 'export'}: ") and "\n" not in err


def test_merge_lora_without_lora_is_refused(video_run, tmp_path, capsys):
    assert export_main([str(video_run.run_dir), str(tmp_path / "out"), "--merge-lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --merge-lora: ") and "model.lora.enabled" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def damage(kind: str, export: Path) -> Path:
    """Damage one file of ``export`` as a half-copied or edited folder leaves it; the damaged file."""
    files = {
        "weights missing": WEIGHTS,
        "weights truncated": WEIGHTS,
        "manifest not JSON": "export.json",
        "tokenizer not JSON": "tokenizer/tokenizer.json",
    }
    edits = {  # a manifest edited by hand, or of another version
        "manifest a list": lambda manifest: [],
        "manifest lacks encoder": lambda manifest: {k: v for k, v in manifest.items() if k != "encoder"},
        "manifest encoder edited": lambda manifest: manifest | {"encoder": {"model": "clip"}},
    }
    path = export / files.get(kind, "export.json")
    if kind == "weights missing":
        path.unlink()
    elif kind in edits:
        path.write_text(json.dumps(edits[kind](json.loads(path.read_text()))))
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


@pytest.mark.parametrize(
    "kind",
    [
        "weights missing",
        "weights truncated",
        "manifest not JSON",
        "tokenizer not JSON",
        "manifest a list",  # these three were tracebacks (AttributeError, KeyError, TypeError)
        "manifest lacks encoder",
        "manifest encoder edited",
    ],
)
def test_a_damaged_export_is_one_line_naming_the_file(video_run, tmp_path, capsys, kind):
    """Before: FileNotFoundError, SafetensorError or JSONDecodeError tracebacks, exit 1."""
    export = tmp_path / "export"
    assert export_main([str(video_run.run_dir), str(export)]) == 0
    capsys.readouterr()
    broken = damage(kind, export)
    video = video_run.videos / "vid_blue_a.mp4"
    assert predict_main([str(video), "--run", str(export), "--query", QUERIES[0]]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {broken if kind != 'tokenizer not JSON' else broken.parent}: "), line


def test_a_checkpoint_choice_for_an_export_is_refused(video_run, tmp_path, capsys):
    """Before: ``--ckpt last`` (or a path that does not exist) was ignored, exit 0."""
    export = tmp_path / "export"
    assert export_main([str(video_run.run_dir), str(export)]) == 0
    capsys.readouterr()
    video = video_run.videos / "vid_blue_a.mp4"
    assert predict_main([str(video), "--run", str(export), "--query", QUERIES[0], "--ckpt", "last"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: ckpt last: {export} is an exported model, which holds one set of weights"
