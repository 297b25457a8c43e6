"""The GRPO stage: sampling G answers, the loss against its formula computed here independently,
the policy's log-probabilities, and ``experiment=grpo`` from a tiny supervised run."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import train
from grounding.answer_format.targets import RefineRound
from grounding.answer_format.tokens import IGNORE_INDEX, OFFSET, RETHINK
from lightning_modules.decoding import InferenceSpec
from lightning_modules.generation import Sampling
from lightning_modules.grpo_loss import group_advantages, grpo_loss, no_signal_share
from lightning_modules.grpo_module import GRPOModule, GRPOSpec, choices_made, segment_steps
from lightning_modules.language_model import LoraSpec
from lightning_modules.optimization import OptimSpec
from lightning_modules.slot_logits_processor import layout_automaton
from tests import helpers, launched
from timerefine import evaluate
from timerefine.inference.grounder import Grounder
from timerefine.pipeline.best_checkpoint import checkpoint_path
from timerefine.pipeline.config import ConfigError
from timerefine.pipeline.init_from_run import train_config
from timerefine.tools.export import main as export_main

SMALL = [
    "data.source.num_train=16",
    "data.source.num_val=4",
    "data.source.num_test=4",
    "data.batch_size=4",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
]
TINY = ["experiment=tiny", *SMALL]
GRPO = ["experiment=grpo", *SMALL, "grpo.G=4", "callbacks.progress_bar=none"]
ROOT = Path(__file__).resolve().parents[1]
LOGGED = ("reward_mean", "reward_std", "no_signal", "kl", "clip_fraction", "sampled_iou", "answer_length")


def grpo_module(lora: LoraSpec | None = None, **spec) -> GRPOModule:
    base = helpers.module(lora=lora)
    module = GRPOModule(
        base.model, base.codec, 1.0, OptimSpec(warmup_steps=1), InferenceSpec(), grpo=GRPOSpec(**spec)
    )
    module.keep_reference()
    return module


# ---- sampling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("constrained", [True, False])
def test_samples_are_identical_at_temperature_0_and_differ_above(constrained):
    group = 6
    batch = helpers.batch(n=2)
    torch.manual_seed(0)
    greedy = grpo_module(G=group, temperature=0.0, constrained=constrained).sample(batch)
    sampled = grpo_module(G=group, temperature=1.0, constrained=constrained).sample(batch)
    for query in range(2):
        same = greedy[query * group : (query + 1) * group]
        assert all(answer == same[0] for answer in same)
        drawn = sampled[query * group : (query + 1) * group]
        assert len({tuple(answer) for answer in drawn}) > 1


def test_constrained_samples_all_parse():
    module = grpo_module(G=8, temperature=1.0)
    batch = helpers.batch(n=2)
    predictions = module.parse_answers(module.sample(batch))
    assert all(len(p.segments) == module.codec.schedule.num_segments for p in predictions)


def test_a_tiny_top_p_keeps_only_the_most_likely_token():
    scores = torch.tensor([[0.0, 2.0, 1.0, -torch.inf]] * 50)
    assert Sampling(1.0, top_p=1e-6)(scores).eq(1).all()
    assert set(Sampling(1.0, top_p=1.0)(scores).tolist()) == {0, 1, 2}  # never the disallowed one


# ---- the loss ---------------------------------------------------------------------------------------
def test_the_loss_matches_the_formula():
    """Two queries, G = 3, answers of up to 3 counted tokens; everything recomputed with plain floats."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.2])
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.1, -0.3, 0.0], [-1.5, -0.2, -0.7]] * 2)
    old = logp + torch.tensor([[0.3, -0.3, 0.0], [0.4, 0.1, 0.0], [0.0, 0.25, -0.3]] * 2)
    ref = logp + torch.tensor([[0.1, 0.2, -0.1], [0.0, -0.2, 0.0], [0.5, 0.0, 0.05]] * 2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]] * 2)
    epsilon, beta = 0.2, 0.04

    advantages = []
    for group in (rewards[:3].tolist(), rewards[3:].tolist()):
        mean = sum(group) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 2)  # unbiased, as torch.std
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    per_answer, kls, cut, counted = [], 0.0, 0, 0
    for row in range(6):
        terms = []
        for t in range(3):
            if not mask[row, t]:
                continue
            lp, lo, lr, a = float(logp[row, t]), float(old[row, t]), float(ref[row, t]), advantages[row]
            ratio = math.exp(lp - lo)
            surrogate = min(ratio * a, min(max(ratio, 1 - epsilon), 1 + epsilon) * a)
            kl = math.exp(lr - lp) - (lr - lp) - 1
            terms.append(-surrogate + beta * kl)
            kls, counted = kls + kl, counted + 1
            cut += (ratio < 1 - epsilon and a < 0) or (ratio > 1 + epsilon and a > 0)
        per_answer.append(sum(terms) / len(terms))
    expected = sum(per_answer) / 6

    computed_advantages = group_advantages(rewards, 3)
    assert computed_advantages.tolist() == pytest.approx(advantages, abs=1e-6)
    loss, stats = grpo_loss(logp, old, ref, computed_advantages, mask, epsilon, beta)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(stats["kl"]) == pytest.approx(kls / counted, abs=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(cut / counted, abs=1e-6)
    assert cut > 0  # the case exercises the clip
    assert float(no_signal_share(rewards, 3)) == 0.5  # the second group's rewards are all equal
    assert computed_advantages[3:].eq(0).all()


def test_no_signal_with_credit_per_step_needs_every_segment_equal():
    """With ``credit=step`` each segment's column has its own advantages: a group whose final
    rewards tie still learns from its earlier segments (it counted as no signal before)."""
    final_tie = torch.tensor(
        [[0.2, 0.5, 0.5], [0.4, 0.5, 0.5], [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]]
    )  # groups of 2
    assert float(no_signal_share(final_tie, 2)) == 0.5
    assert float(no_signal_share(final_tie[:, -1], 2)) == 1.0


# ---- credit per step --------------------------------------------------------------------------------
def test_each_chosen_token_is_credited_to_the_segment_it_writes():
    """K = 3: round 0's start and end write the first coarse segment (0); round i's offsets, and the
    coarse segment round i restates after <RETHINK>, write round i's refined segment (i + 1)."""
    codec = helpers.codec(3)
    rounds = [
        RefineRound(10, 60, 2, -3),
        RefineRound(12, 57, 1, 0),
        RefineRound(13, 57, 0, 1),
        RefineRound(13, 58, 0, 0),
    ]
    answer = codec.encode(rounds)
    automaton = layout_automaton(codec.slots(), codec.end_id)
    markers = set(codec.tokenizer.convert_tokens_to_ids([OFFSET, RETHINK]))
    steps = [segment_steps(answer, markers)[place] for place, _ in choices_made(automaton, answer)]
    assert steps == [0] * 4 + [1] * 6 + [2] * 10 + [3] * 10 + [4] * 10


def test_step_credit_gives_each_token_its_segments_advantage():
    """With ``credit=step`` a token's advantage is its segment's reward normalised within the group;
    the last segment's equals the answer's own advantage (``credit=answer``)."""
    torch.manual_seed(0)
    module = grpo_module(G=4, temperature=1.0, credit="step")
    batch = helpers.batch(n=2)
    rollout = module.rollout(batch)
    assert rollout.advantages.shape == rollout.mask.shape
    answers = [row[rollout.labels[i] != IGNORE_INDEX].tolist() for i, row in enumerate(rollout.input_ids)]
    records = [r for r in batch["records"] for _ in range(4)]
    per_step, _ = module.rewards(answers, records)
    assert per_step.shape == (8, module.codec.schedule.num_segments)
    expected = torch.stack([group_advantages(column, 4) for column in per_step.T], 1)
    for row, place in rollout.mask.nonzero().tolist():
        column = int(rollout.step[row, place])
        assert float(rollout.advantages[row, place]) == pytest.approx(float(expected[row, column]))
    last = rollout.step == module.codec.schedule.num_segments - 1
    answer_level = group_advantages(per_step[:, -1], 4)[:, None].expand_as(last)
    torch.testing.assert_close(rollout.advantages[last & rollout.mask], answer_level[last & rollout.mask])
    assert set(rollout.step[rollout.mask].tolist()) == set(range(module.codec.schedule.num_segments))


def test_per_token_advantages_enter_the_loss_token_by_token():
    """At ratio 1 without KL the loss is minus the mean over answers of each answer's mean token advantage."""
    logp = torch.zeros(2, 3)
    advantages = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, _ = grpo_loss(logp, logp, None, advantages, mask, 0.2, 0.0)
    assert float(loss) == pytest.approx(-((1.0 - 2.0 + 0.5) / 3 + (0.0 + 3.0) / 2) / 2)


@pytest.mark.parametrize(("max_steps", "stepping_batches", "steps"), [(-1, 8, 16), (6, 6, 6), (16, 4, 8)])
def test_the_lr_schedule_spans_the_optimizer_steps(max_steps, stepping_batches, steps):
    """Lightning estimates the batches that step, min(batches x epochs, max_steps); a rollout steps
    num_iterations times and max_steps counts those steps. Before, 8 rollouts of 2 steps (one epoch)
    reached the lr floor at step 8 of 16."""
    module = grpo_module(num_iterations=2)
    module._trainer = SimpleNamespace(estimated_stepping_batches=stepping_batches, max_steps=max_steps)
    curve = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert curve(steps - 1) > curve(steps) == module.optim.min_lr_ratio


# ---- the stage --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def supervised(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("supervised")
    assert train.main([*TINY, f"output_dir={run}"]) == 0
    return run


def logged(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "csv" / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("train/loss")]


@pytest.mark.slow
def test_grpo_stage_runs_from_a_supervised_run(supervised, tmp_path):
    run = tmp_path / "grpo"
    overrides = [
        *GRPO,
        f"init_from_run={supervised}",
        "grpo.num_iterations=2",
        "grpo.reward=[refine_gain]",
        "callbacks.checkpoint.save_top_k=-1",
        f"output_dir={run}",
    ]
    assert train.main(overrides) == 0
    rows = logged(run)
    assert len(rows) == 2  # a rollout every 2 steps, logged each time
    # val_check_interval=2 counts optimizer steps, as max_steps does (before: rollouts, so step 4 only)
    best = sorted(p.name for p in (run / "checkpoints").glob("best-*"))
    assert best == ["best-step2.ckpt", "best-step4.ckpt"]
    assert all(row[f"train/{name}"] for row in rows for name in LOGGED)
    saved = torch.load(checkpoint_path(run, "last"), map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    start = torch.load(checkpoint_path(supervised, "best"), map_location="cpu", weights_only=False)
    assert saved["state_dict"].keys() == start["state_dict"].keys()  # the reference is not saved
    assert evaluate.main([str(run)]) == 0
    # its export loads alone (before: its config said grpo.enabled=true without init_from_run: refused)
    assert export_main([str(run), str(tmp_path / "export")]) == 0
    exported = Grounder.from_export(tmp_path / "export").run.module.state_dict()
    loaded = Grounder.from_run(run).run.module
    assert [n for n, t in loaded.state_dict().items() if not torch.equal(t, exported[n])] == []
    # before: with its KL reference, a second model that predict never reads
    assert loaded.reference_digest() is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "grpo.enabled=true needs init_from_run"),
        (
            ["grpo.num_iterations=3", "init_from_run=RUN"],
            "trainer.max_steps=4 must be a multiple of grpo.num_iterations=3",
        ),
        (
            ["grpo.num_iterations=2", "trainer.val_check_interval=3", "init_from_run=RUN"],
            "trainer.val_check_interval=3 must be a multiple of grpo.num_iterations=2",
        ),
        (["grpo.reward=[bleu]", "init_from_run=RUN"], "grpo.reward=['bleu']: every value"),
        (
            ["grpo.credit=step", "grpo.constrained=false", "init_from_run=RUN"],
            "credit=step needs constrained=true",
        ),
        (  # was: 'trainer.max_steps=4 leaves no step for the LM after ...' (review)
            ["model.saliency.projector_steps=5", "init_from_run=RUN"],
            "model.saliency.projector_steps must be 0 with grpo.enabled=true",
        ),
    ],
)
def test_grpo_config_mistakes_name_the_key(supervised, overrides, message):
    given = [*GRPO, *(o.replace("RUN", str(supervised)) for o in overrides)]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        train_config(given)


def test_gradient_accumulation_is_refused_before_anything_is_written(supervised, tmp_path, capsys):
    """Before: Lightning's MisconfigurationException traceback at fit, after config.yaml and the
    tokenizer were written (so the same command without the key was refused as another run's)."""
    run = tmp_path / "grpo"
    given = [*GRPO, f"init_from_run={supervised}", "+trainer.accumulate_grad_batches=2", f"output_dir={run}"]
    capsys.readouterr()
    assert train.main(given) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: trainer.accumulate_grad_batches=2: GRPO steps on each rollout")
    assert not (run / "config.yaml").exists() and not (run / "tokenizer").exists()


def test_the_stage_takes_its_runs_optimiser_unless_the_command_line_gives_one(supervised):
    """As conf/experiment/grpo.yaml says: model.optim is the run's; model.optim.* given apply on top."""
    given = [*GRPO, f"init_from_run={supervised}"]
    run = OmegaConf.load(supervised / "config.yaml").model.optim
    assert train_config(given).model.optim == run
    given += ["model.optim.lr=1e-4", "model.optim.warmup_steps=0"]
    optim = train_config(given).model.optim
    assert (optim.lr, optim.warmup_steps, optim.weight_decay) == (1e-4, 0, run.weight_decay)


def grpo_command(supervised: Path, run: Path) -> list[str]:
    overrides = [
        *GRPO,
        f"init_from_run={supervised}",
        "grpo.num_iterations=2",
        "trainer.max_steps=8",
        "callbacks.checkpoint.last_every_n_steps=2",
        f"output_dir={run}",
    ]
    return ["train.py", *overrides]


@pytest.mark.slow
def test_a_killed_grpo_run_resumes_exactly(supervised, tmp_path):
    """Killed right after its first last.ckpt (a rollout's two steps done), then run again: the same
    weights and metrics as an uninterrupted run (the samples' random state goes on too)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole_run = [sys.executable, *grpo_command(supervised, whole)]  # a fresh interpreter: another hash seed
    subprocess.run(whole_run, cwd=ROOT, env=env, check=True, capture_output=True)
    last = killed / "checkpoints" / "last.ckpt"
    process = launched.Launched(grpo_command(supervised, killed), env=env)
    while not last.exists():
        assert process.poll() is None, "the run ended before writing last.ckpt"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] < 8
    result = launched.run(grpo_command(supervised, killed), env=env, timeout=300)
    assert result.returncode == 0 and "resuming from" in result.stderr, result.stderr[-3000:]
    expected = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    for name, tensor in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert json.loads((killed / "metrics.json").read_text()) == json.loads(
        (whole / "metrics.json").read_text()
    )


@pytest.mark.slow
def test_resuming_against_a_changed_starting_run_is_refused(tmp_path, capsys):
    """Before: the run it started from had trained on (its best checkpoint another), and the resumed
    GRPO run silently took that as its KL reference."""
    start, run = tmp_path / "supervised", tmp_path / "grpo"
    assert train.main([*TINY, f"output_dir={start}"]) == 0
    stage = [
        *GRPO,
        f"init_from_run={start}",
        "callbacks.checkpoint.last_every_n_steps=2",
        f"output_dir={run}",
    ]
    assert train.main([*stage, "trainer.max_steps=2"]) == 0
    best = checkpoint_path(start, "best")
    checkpoint = torch.load(best, weights_only=False)
    name = next(n for n in checkpoint["state_dict"] if "projector" in n)
    checkpoint["state_dict"][name] += 0.01  # as if the supervised run had trained on
    torch.save(checkpoint, best)
    capsys.readouterr()
    assert train.main([*stage, "trainer.max_steps=4"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"error: {run / 'checkpoints' / 'last.ckpt'}: this GRPO run started from other weights"
    )
