"""FSDP on 2 CPU processes (gloo): weight-decay groups of flattened shards, gradients clipped by the norm
of every rank's shards, ranks in step while decoding.

torch's FSDP (``use_orig_params=True``, decoder layers auto-wrapped, as ``pipeline/strategy.py`` builds
it) runs on CPU with gloo; Lightning's ``FSDPStrategy`` refuses ``accelerator=cpu``, so the module is
wrapped here the way that strategy wraps it (the LightningModule is the root FSDP unit, and evaluation
runs inside the root's forward).
"""

from __future__ import annotations

import gc
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from callbacks.lightning_compat import KeptRootFSDPStrategy
from lightning_modules.generation import Generation, generate
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.language_model import LoraSpec
from lightning_modules.optimization import NonFiniteLossError
from tests import helpers
from timerefine.pipeline.strategy import build_strategy, decoder_layer_classes

WORLD = 2
DEADLINE_S = 120
FSDP_PREFIX = "_fsdp_wrapped_module."


def _spawn(worker, tmp_path: Path, *args: Any) -> list[dict]:
    """Run ``worker(rank, store, out_dir, *args)`` on 2 processes; fail (not hang) past the deadline."""
    context = mp.start_processes(
        worker,
        (str(tmp_path / "store"), str(tmp_path), *args),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {DEADLINE_S} s (hang)")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )


def _shut_down() -> None:
    """Free what still holds the process group (FSDP units sit in reference cycles), then destroy it,
    while the interpreter is alive: a gloo group whose last reference goes during the interpreter's
    shutdown can abort the process ("terminate called without an active exception"; seen once in CI)."""
    gc.collect()
    dist.destroy_process_group()


def _shard(module: nn.Module, layers: nn.Module) -> FullyShardedDataParallel:
    return FullyShardedDataParallel(
        module,
        auto_wrap_policy=ModuleWrapPolicy(decoder_layer_classes(layers)),
        use_orig_params=True,
        device_id=torch.device("cpu"),  # on CPU FSDP needs it named
    )


# ---- weight-decay groups ---------------------------------------------------------------------------


def _optimizer_groups(rank: int, store: str, out: str, lora: dict | None) -> None:
    _init(rank, store)
    module = helpers.module(refine_steps=1, lora=LoraSpec(**lora) if lora else None)
    full_ndim = {n: p.ndim for n, p in module.named_parameters() if p.requires_grad}
    wrapped = _shard(module, module.model.lm)
    flat = {n.replace(FSDP_PREFIX, ""): p for n, p in module.named_parameters()}
    module.trainer = L.Trainer(accelerator="cpu", max_steps=10, max_epochs=-1, logger=False)
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in flat.items()}
    result = {
        "full_ndim": full_ndim,
        "flat_ndim": {n: p.ndim for n, p in flat.items() if p.requires_grad},
        "groups": [
            {"names": [names[id(p)] for p in group["params"]], "weight_decay": group["weight_decay"]}
            for group in optimizer.param_groups
        ],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    del wrapped, module, optimizer, flat, names
    _shut_down()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("lora", "decayed", "not_decayed"),
    [
        (
            {"r": 4, "alpha": 8, "dropout": 0.0},
            ("lora_A", "trainable_tokens_delta"),
            ("projector.net.0.bias",),
        ),
        (None, ("embed_tokens", "lm_head", "mlp.up_proj"), ("input_layernorm", "model.norm")),
    ],
    ids=["lora", "full"],
)
def test_fsdp_weight_decay_groups_match_the_unsharded_model(
    tmp_path: Path, lora: dict | None, decayed: tuple[str, ...], not_decayed: tuple[str, ...]
) -> None:
    """Under FSDP every trainable parameter is a flat 1-D shard; the decay group must still hold the
    weight matrices and embeddings (those with 2+ dims before sharding) and only them, on every rank."""
    for rank in _spawn(_optimizer_groups, tmp_path, lora):
        assert set(rank["flat_ndim"]) == set(rank["full_ndim"])
        assert set(rank["flat_ndim"].values()) == {1}  # what the optimizer sees: flattened shards
        matrices = {n for n, ndim in rank["full_ndim"].items() if ndim >= 2}
        decay, no_decay = rank["groups"]
        assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
        assert set(decay["names"]) == matrices
        assert set(no_decay["names"]) == set(rank["full_ndim"]) - matrices
        assert all(any(part in n for n in decay["names"]) for part in decayed)
        assert all(any(part in n for n in no_decay["names"]) for part in not_decayed)


# ---- the strategy --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fsdp", "fsdp_cpu_offload"])
def test_lightnings_fsdp_names_build_the_projects_strategy(name: str) -> None:
    """Before (review): ``trainer.strategy=fsdp`` gave Lightning's own strategy, which lost its root unit
    after fitting (the final validation failed) and wrapped the model as one unit."""
    model = helpers.video_llm()
    strategy = build_strategy(name, model)
    assert isinstance(strategy, KeptRootFSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)  # of its decoder layers
    assert bool(strategy.cpu_offload and strategy.cpu_offload.offload_params) == (name == "fsdp_cpu_offload")
    assert build_strategy("ddp", model) == "ddp"


# ---- gradient clipping -----------------------------------------------------------------------------

MAX_NORM = 1e-3


class _Training(nn.Module):
    """The training loss inside the root unit's forward, as Lightning's FSDP strategy runs training_step."""

    def __init__(self, module: GroundingModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.module._losses(batch)["loss"]


def _gradient_norm(module: nn.Module, across_ranks: bool) -> float:
    square = torch.stack([p.grad.pow(2).sum() for p in module.parameters() if p.grad is not None]).sum()
    if across_ranks:
        dist.all_reduce(square)
    return square.sqrt().item()


def _clipping(rank: int, store: str, out: str) -> None:
    """The gradient's norm unsharded, and sharded before and after the module clips it."""
    _init(rank, store)
    batch = helpers.batch(refine_steps=1)  # the same on both ranks: FSDP's mean gradient is this batch's
    unsharded = helpers.module(refine_steps=1).eval()  # no dropout: the sharded and unsharded losses are one
    unsharded._losses(batch)["loss"].backward()
    module = helpers.module(refine_steps=1).eval()
    wrapped = _shard(_Training(module), module.model.lm)
    module.trainer = L.Trainer(accelerator="cpu", logger=False)
    module.trainer.strategy.model = wrapped  # as Lightning's FSDPStrategy holds the root unit
    module.trainer.strategy.precision_plugin = FSDPPrecision("32-true")
    wrapped(batch).backward()
    before = _gradient_norm(module, across_ranks=True)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    module.configure_gradient_clipping(optimizer, MAX_NORM, "norm")  # Lightning's call
    after = _gradient_norm(module, across_ranks=True)
    result = {"reference": _gradient_norm(unsharded, across_ranks=False), "before": before, "after": after}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    del wrapped, module, unsharded, optimizer
    _shut_down()


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_clips_by_the_norm_of_every_ranks_shards(tmp_path: Path) -> None:
    """``trainer.gradient_clip_val`` (1.0 by default) under FSDP: Lightning's FSDP precision refuses
    clipping by norm, so every FSDP run stopped at its first step; the norm must be the whole
    gradient's, over both ranks' shards (each rank clipping its own shards would leave it sqrt(2) x
    too large)."""
    for rank in _spawn(_clipping, tmp_path):
        assert rank["before"] == pytest.approx(rank["reference"], rel=1e-4)
        assert rank["before"] > 10 * MAX_NORM
        assert rank["after"] == pytest.approx(MAX_NORM, rel=1e-3)


def _nan_on_rank_0(rank: int, store: str, out: str) -> None:
    _init(rank, store)
    module = helpers.module(refine_steps=1).eval()
    wrapped = _shard(_Training(module), module.model.lm)
    module.trainer = L.Trainer(accelerator="cpu", logger=False)
    module.trainer.strategy.model = wrapped
    wrapped(helpers.batch(refine_steps=1)).backward()
    if rank == 0:  # an overflow in one rank's shard of the gradient
        next(p for p in module.parameters() if p.grad is not None and p.grad.numel()).grad[0] = float("nan")
    try:
        module.on_before_optimizer_step(torch.optim.SGD(module.parameters(), lr=0.0))
        stopped = ""
    except NonFiniteLossError as error:
        stopped = str(error)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"stopped": stopped}))
    del wrapped, module
    _shut_down()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_non_finite_gradient_in_one_ranks_shard_stops_every_rank(tmp_path: Path) -> None:
    """Before (review): only the rank holding it stopped; the others went on into the next collective
    and waited there until its timeout."""
    for rank in _spawn(_nan_on_rank_0, tmp_path):
        assert "the gradients are not finite" in rank["stopped"]


# ---- free decoding ---------------------------------------------------------------------------------

MAX_NEW_TOKENS = 16


class _Decoding(nn.Module):
    """Evaluation inside the root unit's forward, as Lightning's FSDP strategy runs validation_step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], eos_id: int) -> Generation:
        return generate(
            self.model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], eos_id, MAX_NEW_TOKENS
        )


def _free_decoding(rank: int, store: str, out: str, rows: list[list[int]], eos_id: int) -> None:
    _init(rank, store)
    model = helpers.video_llm(seed=0).eval()
    forwards = [0]
    model.lm.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    decoding = _shard(_Decoding(model), model.lm)
    batch = helpers.collator()([helpers.items(8, "val")[i] for i in rows[rank]])
    generation = decoding(batch, eos_id)
    result = {"forwards": forwards[0], "tokens": generation.tokens}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    del decoding, model
    _shut_down()


def _rows_ending_early_and_late() -> tuple[list[list[int]], int, list[list[int]]]:
    """Validation rows split so that rank 0's answers all end within a few tokens and rank 1's never
    end, with the token that ends them and the single-process answers."""
    model = helpers.video_llm(seed=0).eval()
    batch = helpers.batch(n=8, split="val")
    free = generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], -1, MAX_NEW_TOKENS)
    eos_id = free.tokens[0][-1]
    early = [i for i, t in enumerate(free.tokens) if eos_id in t[: MAX_NEW_TOKENS // 2]]
    late = [i for i, t in enumerate(free.tokens) if eos_id not in t]
    assert early and late, free.tokens
    answers = [t[: t.index(eos_id)] if eos_id in t else t for t in free.tokens]
    return [early, late], eos_id, answers


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_free_decoding_keeps_ranks_in_step(tmp_path: Path) -> None:
    """Rank 0's answers end after a few tokens, rank 1's run to ``MAX_NEW_TOKENS``: both ranks must run
    the same forward passes (each one all-gathers the sharded layers) and give single-process answers."""
    rows, eos_id, answers = _rows_ending_early_and_late()
    ranks = _spawn(_free_decoding, tmp_path, rows, eos_id)
    # The prompt's pass gives the first token, each later pass the next; the last token never runs.
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == MAX_NEW_TOKENS
    for rank, result in zip(rows, ranks, strict=True):
        assert result["tokens"] == [answers[i] for i in rank]


def _unsharded_decoding(rank: int, store: str, out: str, rows: list[list[int]], eos_id: int) -> None:
    _init(rank, store)
    model = helpers.video_llm(seed=0).eval()
    batch = helpers.collator()([helpers.items(8, "val")[i] for i in rows[rank]])
    calls = 2 - rank  # as under DDP when one rank's share of the split holds one batch more
    tokens = [
        generate(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], eos_id, MAX_NEW_TOKENS
        ).tokens
        for _ in range(calls)
    ]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"tokens": tokens}))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_unsharded_free_decoding_waits_for_no_other_rank(tmp_path: Path) -> None:
    """Without FSDP (DDP, single device) the forward passes are local: ranks decode independently, also
    when they evaluate different numbers of batches."""
    rows, eos_id, answers = _rows_ending_early_and_late()
    ranks = _spawn(_unsharded_decoding, tmp_path, rows, eos_id)
    assert [len(r["tokens"]) for r in ranks] == [2, 1]
    for rank, result in zip(rows, ranks, strict=True):
        assert all(tokens == [answers[i] for i in rank] for tokens in result["tokens"])
