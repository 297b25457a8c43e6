"""GRPO under fp16's loss scaling (``trainer.precision=16-mixed``, the choice on GPUs without bf16):
its manual optimisation clips the gradients Lightning has unscaled; under ``bf16-true`` its KL reference
is cast as the policy is."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from lightning_modules.decoding import InferenceSpec
from lightning_modules.grpo_module import GRPOModule, GRPOSpec
from lightning_modules.optimization import OptimSpec
from tests import helpers


class GradientNorms(L.Callback):
    """The norm of the gradients each optimizer step took (they stay until the next step's zero_grad)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def test_gradients_are_clipped_once_the_loss_scale_is_undone():
    """Before (review): clipped in training_step, before Lightning unscaled them, so the loss scale's
    gradients were clipped to trainer.gradient_clip_val and every step took 1/scale of it."""
    base, limit = helpers.module(), 1e-3
    module = GRPOModule(
        base.model, base.codec, 1.0, OptimSpec(warmup_steps=1), InferenceSpec(), grpo=GRPOSpec(G=4),
        max_grad_norm=limit,
    )  # fmt: skip
    module.keep_reference()
    norms, scaler = GradientNorms(), torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
        callbacks=[norms],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader([helpers.batch(n=4, start=s) for s in (0, 4)], batch_size=None))
    assert norms.norms == pytest.approx([limit, limit], rel=1e-3)


class FirstKL(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.kl = float(trainer.callback_metrics["train/kl"])


def test_under_true_precision_the_reference_is_in_the_policys_dtype():
    """Before (review): the reference stayed float32 against a bfloat16 policy, so the first KL, between
    two copies of one model, was 6e-8 (rounding), not 0, and the reference took twice the policy's memory."""
    base = helpers.module()
    module = GRPOModule(
        base.model, base.codec, 1.0, OptimSpec(warmup_steps=1), InferenceSpec(), grpo=GRPOSpec(G=4)
    )
    module.keep_reference()
    digest, first = copy.deepcopy(module).reference_digest(), FirstKL()  # this module's is not cached yet
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision="bf16-true",
        callbacks=[first],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader([helpers.batch(n=4)], batch_size=None))
    reference = module._reference[0]
    assert {t.dtype for t in reference.parameters()} == {torch.bfloat16}
    assert first.kl == 0.0
    assert module.reference_digest() == digest  # a resume compares the weights it started from
