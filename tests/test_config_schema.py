"""One source of defaults, one registry per kind: the composed configs are the schema dataclasses'
defaults, no YAML restates one of them, and a dataset is one conf/data YAML plus its loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from datamodules.annotation_source import LOADERS
from datamodules.quirks import QuirkReport
from grounding.records import GroundingRecord
from timerefine.pipeline.build import build_datamodule
from timerefine.pipeline.config import CONF_DIR, load_config
from timerefine.pipeline.schema import DATA_SCHEMAS, ModelConfig

DATASETS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def defaults_of(spec: object) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(spec))


def data_schema(path: Path) -> str:
    """The name of the schema in DATA_SCHEMAS that a conf/data YAML starts from."""
    (choice,) = [d for d in OmegaConf.load(path).defaults if d.startswith("/schema/data/")]
    return choice.removeprefix("/schema/data/").removesuffix("@_here_")


def schema_of(path: Path) -> dict:
    """The schema defaults a conf/model or conf/data YAML starts from."""
    return defaults_of(ModelConfig() if path.parent.name == "model" else DATA_SCHEMAS[data_schema(path)])


def test_the_default_model_is_the_schema_default():
    assert OmegaConf.to_container(load_config(["output_dir=unused"]).model) == defaults_of(ModelConfig())


@pytest.mark.parametrize("dataset", DATASETS)
def test_each_dataset_config_is_its_schema_and_what_its_yaml_changes(dataset):
    path = CONF_DIR / "data" / f"{dataset}.yaml"
    changed = OmegaConf.load(path)
    changed.pop("defaults")
    expected = OmegaConf.merge(schema_of(path), changed)
    data = load_config([f"data={dataset}", "output_dir=unused"]).data
    assert OmegaConf.to_container(data) == OmegaConf.to_container(expected)
    assert type(OmegaConf.to_object(data.source)) is type(DATA_SCHEMAS[data_schema(path)].source)


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


@pytest.mark.parametrize(
    "path", sorted(p for group in ("model", "data") for p in (CONF_DIR / group).glob("*.yaml")), ids=str
)
def test_no_yaml_restates_a_schema_default(path: Path):
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.pop("defaults", None)
    defaults = _leaves(schema_of(path))
    restated = {k: v for k, v in _leaves(values).items() if k in defaults and defaults[k] == v}
    assert not restated, f"{path} restates schema defaults: {restated}"


TOY_YAML = """\
defaults:
  - /schema/data/annotated@_here_
  - _self_
name: toy
source:
  root: {root}
  splits: {{train: fit, val: held_out, test: held_out}}
  num_frames: 8
  feature_dim: 16
"""


def load_toy(root: str, split: str, policy: object) -> tuple[list[GroundingRecord], QuirkReport]:
    """A dataset's loader: its records of ``split`` and the report of what it dropped (nothing)."""
    records = [
        GroundingRecord(f"{split}{i}", f"{split}_video{i}", "a person opens a door", 30.0, 2.0 + i, 9.0 + i)
        for i in range(4)
    ]
    return records, QuirkReport(f"{root}/{split}.toy", kept=len(records))


def test_a_dataset_is_one_yaml_and_one_loader(tmp_path, monkeypatch):
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf")
    (conf / "data" / "toy.yaml").write_text(TOY_YAML.format(root=tmp_path))
    monkeypatch.setitem(LOADERS, "toy", load_toy)
    cfg = load_config(["data=toy", f"output_dir={tmp_path / 'run'}"], config_dir=conf)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    assert [r.qid for r in datamodule.records("test")] == ["held_out0", "held_out1", "held_out2", "held_out3"]
    batch = datamodule.collator([datamodule.datasets["train"][(0, i)] for i in range(2)])
    assert batch["features"].shape == (2, 8, 16) and [r.qid for r in batch["records"]] == ["fit0", "fit1"]
