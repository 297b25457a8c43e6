"""The official TimeRefine conventions: seconds-space targets drawn once, the reference aux-loss scaling,
warmup as a share of the steps, and ``experiment=reference_recipe`` / ``paper_*`` as configs and runs."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules.collate import GroundingCollator
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.layout import format_answer, parse_answer
from grounding.answer_format.prompts import DEFAULT_TEMPLATE, render_prompt
from grounding.answer_format.targets import (
    RefineRound,
    RefineSchedule,
    make_seconds_target_rounds,
    sample_coarse_seconds,
    sample_rng,
    seconds_offset_round,
    target_rng,
)
from grounding.answer_format.timeline import UNIFORM99, VTIMELLM100
from grounding.answer_format.tokens import VIDEO
from grounding.metrics.protocols import PROTOCOLS
from lightning_modules.aux_head import AuxHead
from lightning_modules.decoding import InferenceSpec
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.language_model import LMSpec, build_language_model
from lightning_modules.optimization import OptimSpec
from lightning_modules.projector import FrameProjector
from lightning_modules.video_llm import VideoLLM
from tests import helpers, launched
from timerefine.inference.run_loading import load_run
from timerefine.pipeline.config import ConfigError, load_config
from timerefine.tools.rescore import rescore

REFERENCE = RefineSchedule(steps=3, offset_space="seconds", resample="once")

# ---- targets --------------------------------------------------------------------------------------------


def test_offsets_are_rounded_apart_from_the_coarse_segment():
    """GT 10.0-20.0 s of 30 s, coarse 8.6-20.05 s on vtimellm100: coarse indices 29 (28.67) and 67
    (66.83), offsets +1.4 s -> +05 (4.67) and -0.05 s -> -00 (0.17): 29 + 5 = 34 misses the GT
    index 33 by one, and the end offset keeps its sign."""
    round_ = seconds_offset_round((29, 67), (10.0 - 8.6, 20.0 - 20.05), 30.0, VTIMELLM100)
    assert round_ == RefineRound(29, 67, 5, 0, "+-")
    assert round_.refined == (34, 67) and VTIMELLM100.to_index(10.0, 30.0) == 33
    assert format_answer([round_], True) == "From <SEG_START> 29 to 67 <OFFSET> +05 and -00 <SEG_END>."


def test_minus_zero_survives_parsing():
    text = "From <SEG_START> 29 to 67 <OFFSET> +05 and -00 <RETHINK> 33 to 67 <OFFSET> +00 and +00 <SEG_END>."
    rounds = parse_answer(text)
    assert rounds == [RefineRound(29, 67, 5, 0, "+-"), RefineRound(33, 67, 0, 0)]
    assert format_answer(rounds, True) == text
    codec = AnswerCodec(helpers.tokenizer(), RefineSchedule(steps=1))
    assert codec.tokenizer.decode(codec.encode(rounds)).replace(" ", "") == text.replace(" ", "")


def test_coarse_segments_contain_the_truth_and_stay_in_the_video():
    for seed in range(300):
        rng = np.random.default_rng(seed)
        start, end = sample_coarse_seconds((2.0, 9.5), 5.0, 10.0, True, rng)
        assert 0.0 <= start <= 2.0 and 9.5 <= end <= 10.0
    assert sample_coarse_seconds((2.0, 9.5), 0.0, 10.0, True, np.random.default_rng(0)) == (2.0, 9.5)
    free = [sample_coarse_seconds((2.0, 9.5), 5.0, 10.0, False, np.random.default_rng(s)) for s in range(300)]
    assert any(s > 2.0 or e < 9.5 for s, e in free) and all(0 <= s <= e <= 10 for s, e in free)


@pytest.mark.parametrize("timeline", [UNIFORM99, VTIMELLM100])
def test_reference_targets(timeline):
    """4 rounds with std 5, 3, 1, 0 s; start offsets >= 0 and end offsets <= 0 (containment); the last
    round is the truth itself; coarse + offset lands within one index of the truth."""
    gt, duration = (12.3, 20.8), 31.0
    gt_index = (timeline.to_index(gt[0], duration), timeline.to_index(gt[1], duration))
    misses = set()
    for index in range(200):
        rounds = make_seconds_target_rounds(gt, duration, REFERENCE, timeline, sample_rng(0, 0, index))
        assert len(rounds) == 4 and rounds[-1] == RefineRound(*gt_index, 0, 0)
        for round_ in rounds:
            assert round_.offset_start >= 0 and round_.offset_end <= 0
            assert round_.zero_signs[0] == "+"
            misses |= {round_.refined[0] - gt_index[0], round_.refined[1] - gt_index[1]}
    assert misses <= {-1, 0, 1} and misses != {0}


def test_noise_is_drawn_once_or_every_epoch():
    assert target_rng(3, 7, 11, "once").normal() == sample_rng(3, 0, 11).normal()
    assert target_rng(3, 7, 11, "epoch").normal() == sample_rng(3, 7, 11).normal()
    schedules = {"once": REFERENCE, "epoch": RefineSchedule(steps=3, offset_space="seconds")}
    for resample, schedule in schedules.items():
        collate = GroundingCollator(
            AnswerCodec(helpers.tokenizer(), schedule),
            partial(render_prompt, DEFAULT_TEMPLATE),
            helpers.SPEC.num_frames,
            timeline=VTIMELLM100,
        )
        record = helpers.dataset()[0]["record"]
        per_epoch = [collate.target_rounds(record, epoch, 0) for epoch in range(4)]
        assert (per_epoch.count(per_epoch[0]) == 4) == (resample == "once")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"offset_space": "frames"}, "offset_space"),
        ({"resample": "never"}, "resample"),
        ({"offset_space": "seconds", "residual_std": (1.0,)}, "residual_std needs offset_space=index"),
    ],
)
def test_invalid_reference_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefineSchedule(**kwargs)


# ---- aux loss scaling and the optimizer ------------------------------------------------------------------


def test_reference_aux_loss_divides_twice():
    pred = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    target = torch.tensor([[0.4, 0.6], [0.0, 1.0]])
    head = AuxHead(8, "linear", "l1", "reference")
    # |errors| 0.1, 0.1, 0, 0: L1Loss (mean) 0.05, divided by N = 4 scalars
    assert float(head.loss(pred, None, target)) == pytest.approx(0.0125)
    assert float(AuxHead(8, "linear", "l1").loss(pred, None, target)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="reference needs loss l1"):
        AuxHead(8, "linear", "giou", "reference")


def test_module_loss_is_lm_plus_weight_times_the_reference_term():
    torch.manual_seed(0)
    tok = helpers.tokenizer()
    lm = build_language_model(tok, LMSpec(tiny=helpers.TINY), None)
    aux = AuxHead(helpers.HIDDEN, "linear", "l1", "reference")
    model = VideoLLM(
        lm,
        FrameProjector("linear", helpers.SPEC.feature_dim, helpers.HIDDEN),
        tok.convert_tokens_to_ids(VIDEO),
        aux,
    )
    module = GroundingModule(model, helpers.codec(3), 10.0, OptimSpec(), InferenceSpec())
    batch = helpers.batch(3)
    losses = module._losses(batch)
    out = model(batch["input_ids"], batch["attention_mask"], batch["features"], batch["labels"])
    at_offset = batch["input_ids"] == module.offset_id
    segment, _ = aux(out.hidden_states[-1][at_offset])
    target = batch["gt_norm"][at_offset.nonzero()[:, 0]]
    official = 10.0 * torch.nn.L1Loss()(segment.flatten(), target.flatten()) / segment.numel()
    assert float(losses["loss"]) == pytest.approx(float(out.loss + official), rel=1e-5)
    assert float(losses["aux_loss"]) == pytest.approx(float(F.l1_loss(segment, target) / segment.numel()))


def test_warmup_ratio_is_a_share_of_the_steps_rounded_up():
    assert OptimSpec(warmup_ratio=0.03).warmup(1000) == 30
    assert OptimSpec(warmup_ratio=0.03).warmup(10) == 1
    assert OptimSpec(warmup_steps=7).warmup(1000) == 7


# ---- configs ---------------------------------------------------------------------------------------------

RECIPE = {
    "data.timeline": "vtimellm100",
    "eval.protocol": "vtimellm",
    "data.prompt_template": "reference",
    "data.chat_template": "vicuna_v1",
    "data.batch_size": 8,
    "data.global_batch_size": 128,
    "model.projector.kind": "linear",
    "model.projector.temporal_embedding": "none",
    "model.projector.query_conditioned": False,
    "model.projector.frames_per_token": 1,
    "model.saliency.weight": 0.0,
    "model.aux.head": "linear",
    "model.aux.loss": "l1",
    "model.aux.scaling": "reference",
    "model.aux.weight": 10.0,
    "model.refine.steps": 3,
    "model.refine.noise_std": [5.0, 3.0, 1.0, 0.0],
    "model.refine.relative": False,
    "model.refine.contain_gt": True,
    "model.refine.offset_space": "seconds",
    "model.refine.resample": "once",
    "model.refine.on_policy.fraction": 0.0,
    "model.inference.constrained": False,
    "model.lm.grounding_tokens": "reference",
    "model.lm.token_rows_init": "resize",
    "model.answer_tokens": "canonical",
    "model.inference.final": "last",
    "model.inference.order_and_clip": False,
    "model.lora.enabled": True,
    "model.lora.r": 64,
    "model.lora.alpha": 128,
    "model.lora.dropout": 0.05,
    "model.lora.target_modules": ["all-linear"],
    "model.optim.lr": 1e-4,
    "model.optim.weight_decay": 0.0,
    "model.optim.betas": [0.9, 0.999],
    "model.optim.warmup_ratio": 0.03,
    "model.optim.min_lr_ratio": 0.0,
    "trainer.precision": "bf16-mixed",
    "callbacks.checkpoint.monitor": None,
}


def selected(cfg: DictConfig, key: str) -> object:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


@pytest.mark.parametrize("experiment", ["reference_recipe", "paper_charades", "paper_activitynet"])
def test_the_recipe_sets_every_reference_convention(experiment):
    cfg = load_config([f"experiment={experiment}", "output_dir=unused"])
    assert {key: selected(cfg, key) for key in RECIPE} == RECIPE


@pytest.mark.parametrize(
    ("experiment", "dataset"), [("paper_charades", "charades_sta"), ("paper_activitynet", "activitynet")]
)
def test_paper_scale_configs(experiment, dataset):
    cfg = load_config([f"experiment={experiment}", "output_dir=unused"])
    assert cfg.data.name == dataset and cfg.model.lm.name_or_path == "lmsys/vicuna-7b-v1.5"
    assert (cfg.data.source.features, cfg.data.source.num_frames, cfg.data.source.feature_dim) == (
        "folder",
        100,
        768,
    )
    assert dataset in cfg.data.source.feature_path
    assert (cfg.trainer.devices, cfg.trainer.strategy, cfg.trainer.accelerator) == (8, "ddp", "gpu")
    assert cfg.model.lm.gradient_checkpointing and cfg.trainer.max_epochs == 8
    assert (
        cfg.model.init_from.projector.endswith("stage1/mm_projector.bin")
        and not cfg.model.trainable.projector
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.protocol=trace", "eval.protocol=trace: must be one of exact, vtimellm, strict, parsed_only"),
        ("data.timeline=centres", "data.timeline=centres: must be one of uniform99, vtimellm100"),
        (
            "model.refine.offset_space=frames",
            "model.refine.offset_space=frames: must be one of index, seconds",
        ),
        ("model.refine.resample=never", "model.refine.resample=never: must be one of epoch, once"),
        ("model.optim.warmup_ratio=1.5", "model.optim.warmup_ratio=1.5: must be a finite number in [0, 1)"),
        ("model.aux.loss=giou", "model.aux.scaling=reference needs loss=l1, got giou"),
        (
            "model.refine.residual_std=[1,0]",
            "model.refine.residual_std needs offset_space=index: seconds-space offsets are exact",
        ),
    ],
)
def test_bad_convention_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(["experiment=reference_recipe", override, "output_dir=unused"])


# ---- end to end ------------------------------------------------------------------------------------------

TINY_RUN = [
    "data.source.num_train=32",
    "data.source.num_val=8",
    "data.source.num_test=8",
    "data.source.num_frames=16",
    "data.eval_batch_size=8",
    "model.lm.tiny.hidden_size=32",
    "model.lm.tiny.num_layers=1",
    "model.lm.tiny.num_heads=2",
    "model.lm.tiny.intermediate_size=64",
    "model.lm.tokenizer_vocab_size=300",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "model.saliency.projector_steps=0",
    "callbacks.progress_bar=none",
]


def train(output_dir: Path, *overrides: str) -> dict:
    result = launched.run(["train.py", *TINY_RUN, *overrides, f"output_dir={output_dir}"], timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_reference_recipe_runs_end_to_end(tmp_path):
    metrics = train(tmp_path / "run", "experiment=reference_recipe", "data.global_batch_size=16")
    assert metrics["eval/protocol"] == "vtimellm" and metrics["data/timeline"] == "vtimellm100"
    assert metrics["global_step"] == 4 and metrics["test/queries"] == 8
    rows = [json.loads(line) for line in (tmp_path / "run/predictions/test.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(
        {"pred", "pred_index", "gt", "duration", "text"} <= set(row) for row in rows
    )


@pytest.mark.slow
def test_rescoring_a_run_reproduces_its_metrics(tmp_path):
    """The module's metric and timerefine-rescore agree on the run's own predictions file."""
    metrics = train(tmp_path / "run", "data.timeline=vtimellm100", "eval.protocol=vtimellm")
    rescored = rescore(tmp_path / "run/predictions/test.jsonl", PROTOCOLS["vtimellm"])
    for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "parse_fail"):
        assert rescored[key] == pytest.approx(metrics[f"test/{key}"], abs=1e-4), key


@pytest.mark.slow
def test_a_pretrained_run_with_resized_rows_loads_where_it_evaluates(tmp_path):
    """token_rows_init=resize (the reference recipe's) fills the new rows from torch's random state, and
    they are frozen base weights. Before: train.py and evaluate.py seeded it, load_run (predict, export,
    the API, the demo) did not, and refused the run as trained on other base weights."""
    helpers.pretrained_lm(tmp_path / "llama")
    pretrained = [f"model.lm.name_or_path={tmp_path / 'llama'}", "model.lora.enabled=true"]
    train(tmp_path / "run", *pretrained, "model.lm.token_rows_init=resize")
    torch.rand(7)  # whatever the caller's random state
    before = torch.get_rng_state()
    assert load_run(tmp_path / "run", "best").module.training is False
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is left as it was
