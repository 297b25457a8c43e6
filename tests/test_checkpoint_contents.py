"""A checkpoint says what it is: the run's resolved config and its tokenizer travel inside it."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

import train
from lightning_modules.tokenizer import tokenizer_from_files


def test_a_checkpoint_holds_its_config_and_tokenizer(tmp_path):
    run = tmp_path / "run"
    assert train.main(["experiment=tiny", "trainer.max_steps=4", "test=false", f"output_dir={run}"]) == 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    assert checkpoint["hyper_parameters"]["config"] == OmegaConf.to_container(
        OmegaConf.load(run / "config.yaml")
    )
    kept = tokenizer_from_files(checkpoint["tokenizer_files"])
    saved = AutoTokenizer.from_pretrained(run / "tokenizer")
    text = "From <SEG_START> 12 to 34 <OFFSET> +01 and -02 <SEG_END>. a person opens the door"
    assert kept.encode(text) == saved.encode(text)
    assert len(kept) == len(saved)
