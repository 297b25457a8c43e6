"""Where a pretrained LM comes from (lightning_modules/pretrained.py), without loading one: package
files, GGUF conversion into the cache (once, atomically), and the one-line error when it is absent."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import train
from lightning_modules import pretrained
from lightning_modules.pretrained import (
    SETUP_MODELS,
    SMOLLM2,
    SOURCE_FILE,
    MissingModelError,
    converted_gguf,
    missing_model,
    package_file,
    resolve_pretrained,
)
from timerefine.tools.convert_gguf import main as convert_main


def test_a_package_file_is_found_without_importing_the_package():
    found = package_file("package:json/decoder.py")  # any installed package's file
    assert found.name == "decoder.py" and found.is_file()


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            "package:no_such_package_x/model.gguf",
            f"no package 'no_such_package_x' installed; run `{SETUP_MODELS}`",
        ),
        # before: "no package 'json' installed" and the setup command, for an installed package
        (
            "package:json/no_such_file.gguf",
            "no 'no_such_file.gguf' in package 'json'; it holds no .gguf file (package:json/<file>)",
        ),
        ("package:json", "no '' in package 'json'; it holds no .gguf file (package:json/<file>)"),
    ],
)
def test_a_missing_package_file_says_what_is_missing(reference, message):
    with pytest.raises(MissingModelError) as error:
        package_file(reference)
    assert str(error.value) == f"{reference}: {message}"


def test_folders_pass_through(tmp_path):  # a Hub name: tests/test_hub_names.py
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    assert missing_model(str(tmp_path / "absent.gguf")) == "no such GGUF file"


def fake_conversion(calls: list[Path]):
    def convert(path: Path, out: Path, dtype: str) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / SOURCE_FILE).write_text(json.dumps({"dtype": dtype}))

    return convert


def test_a_gguf_file_is_converted_once_per_content_and_dtype(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(pretrained, "convert_gguf", fake_conversion(calls))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF one")
    cache = tmp_path / "cache"
    first = converted_gguf(model, "float32", cache)
    assert converted_gguf(model, "float32", cache) == first and len(calls) == 1
    assert first.parent == cache / "gguf" and first.name.startswith("m-") and first.name.endswith("-float32")
    assert converted_gguf(model, "bfloat16", cache) != first and len(calls) == 2
    model.write_bytes(b"GGUF two")  # other content: another entry
    assert converted_gguf(model, "float32", cache) != first and len(calls) == 3
    assert (
        sorted(p.name.startswith(".") for p in (cache / "gguf").iterdir()) == [False] * 3
    )  # no staging left


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)]
)
def test_a_cache_entry_is_as_readable_as_the_umask_allows(
    tmp_path, monkeypatch, umask, file_mode, folder_mode
):
    """Before: model.safetensors was 0600 (safetensors writes it so) in an entry other users can open."""

    def convert(path: Path, out: Path, dtype: str) -> None:
        save_file({"weight": torch.zeros(2)}, out / "model.safetensors")
        fake_conversion([])(path, out, dtype)

    monkeypatch.setattr(pretrained, "convert_gguf", convert)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    previous = os.umask(umask)
    try:
        entry = converted_gguf(tmp_path / "m.gguf", "float32", tmp_path / "cache")
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (entry, *entry.iterdir())}
    assert modes == {entry.name: folder_mode} | dict.fromkeys(
        ["model.safetensors", "config.json", SOURCE_FILE], file_mode
    )


def test_a_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    def crash(path: Path, out: Path, dtype: str) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(pretrained, "convert_gguf", crash)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(RuntimeError):
        converted_gguf(tmp_path / "m.gguf", "float32", tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_the_cache_folder_comes_from_the_environment(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(pretrained, "convert_gguf", fake_conversion(calls))
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "env_cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_pretrained(str(tmp_path / "m.gguf")).startswith(str(tmp_path / "env_cache" / "gguf"))


def test_convert_tool_errors_are_one_line(tmp_path, capsys):
    assert convert_main([str(tmp_path / "absent.gguf")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'absent.gguf'}: no such GGUF file\n"
    (tmp_path / "weights.bin").write_bytes(b"")
    assert convert_main([str(tmp_path / "weights.bin")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err


CUT = b"GGUF\x03\x00\x00\x00"  # a GGUF header cut short
DAMAGED = b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 4) + b"\xff" * 200  # a metadata key of no text


@pytest.mark.parametrize(
    ("content", "cache", "message"),
    [  # before: each a traceback, exit 1
        (b"\x89PNG\r\n", "cache", "{model}: not a GGUF file (it does not start with the bytes GGUF)"),
        (CUT, "cache", "{model}: not a whole GGUF model transformers can read (unpack_from requires"),
        (DAMAGED, "cache", "{model}: not a whole GGUF model transformers can read ("),  # an OSError before
        (CUT, "taken", "GGUF cache: {taken} is a file, so no directory can be made below it; choose another"),
        (CUT, "taken/sub", "GGUF cache: {taken} is a file, so no directory can be made below it; choose"),
    ],
)
def test_convert_tool_mistakes_are_one_line(tmp_path, capsys, content, cache, message):
    model, taken = tmp_path / "m.gguf", tmp_path / "taken"
    model.write_bytes(content)
    taken.write_text("keep me\n")
    assert convert_main([str(model), "--cache-dir", str(tmp_path / cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + message.format(model=model, taken=taken)), err
    assert not list(tmp_path.glob("cache/gguf/*")) and taken.read_text() == "keep me\n"


def test_convert_tool_takes_the_dtypes_a_run_takes(tmp_path, capsys):
    """Before: any floating torch dtype passed (float8_e4m3fn: a traceback at the conversion)."""
    with pytest.raises(SystemExit) as exit_:
        convert_main([str(tmp_path / "m.gguf"), "--dtype", "float8_e4m3fn"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "(choose from 'float32', 'bfloat16', 'float16')" in err


@pytest.mark.parametrize(
    ("content", "override", "message"),
    [
        (b"\x89PNG", "", "config error: model.lm.name_or_path={model}: not a GGUF file"),
        (CUT, "", "error: {model}: not a whole GGUF model transformers can read"),
        (CUT, "model.lm.dtype=float8_e4m3fn", "config error: model.lm.dtype=float8_e4m3fn: must be one of"),
    ],
)
def test_a_run_on_a_bad_gguf_file_stops_in_one_line(
    tmp_path, monkeypatch, capsys, content, override, message
):
    """Before: a traceback (a dtype that is no torch dtype: at the LM's build)."""
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(content)
    argv = [f"model.lm.name_or_path={model}", f"output_dir={tmp_path / 'run'}", *filter(None, [override])]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(model=model)), err


def test_a_run_without_the_model_installed_stops_in_one_line(tmp_path, monkeypatch, capsys):
    module = SMOLLM2.removeprefix("package:").split("/")[0]
    real_find_spec = pretrained.importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util, "find_spec", lambda name: None if name == module else real_find_spec(name)
    )
    assert train.main(["experiment=smollm2", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: model.lm.name_or_path")
    assert SETUP_MODELS in err[0] and err[0].count(SMOLLM2) == 1
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_no_model_stops_in_one_line(tmp_path, capsys):
    """Before: an empty folder as model.lm.name_or_path was a tokenizer traceback advising sentencepiece;
    a folder holding only a tokenizer, a model traceback (found by a hunt)."""
    from lightning_modules.tokenizer import build_tokenizer

    empty, tokenizer_only = tmp_path / "empty", tmp_path / "tokenizer_only"
    empty.mkdir()
    texts = ["at which time does a person open the door", "From 12 to 34 +01 and -02"] * 20
    build_tokenizer(None, texts, 300).save_pretrained(tokenizer_only)
    for folder, what in ((empty, "tokenizer"), (tokenizer_only, "language model")):
        argv = ["experiment=tiny", f"model.lm.name_or_path={folder}", f"output_dir={tmp_path / 'run'}"]
        assert train.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(
            f"error: model.lm.name_or_path={folder}: no usable {what} loads from it ("
        ), err
