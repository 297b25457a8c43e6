"""One source of defaults: the composed configs are the schema dataclasses' defaults, and no YAML file
restates one of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from timerefine.pipeline.config import CONF_DIR, load_config
from timerefine.pipeline.schema import DATASETS, ModelConfig, as_node


def composed(*overrides: str) -> dict:
    return OmegaConf.to_container(load_config([*overrides, "output_dir=unused"]))


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_each_dataset_config_is_its_schema_default(dataset):
    assert composed(f"data={dataset}")["data"] == as_node(DATASETS[dataset])


def test_the_default_model_is_the_schema_default():
    assert composed()["model"] == as_node(ModelConfig())


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
    group = path.parent.name
    schema = as_node(ModelConfig()) if group == "model" else as_node(DATASETS[path.stem])
    defaults = _leaves(schema)
    restated = {k: v for k, v in _leaves(values).items() if k in defaults and defaults[k] == v}
    assert not restated, f"{path} restates schema defaults: {restated}"
