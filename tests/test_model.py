"""The Video LLM: aux head losses, module losses, generation, LoRA."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from grounding.answer_format.layout import parse_answer
from grounding.answer_format.predictions import Prediction
from grounding.answer_format.slots import Slot
from grounding.answer_format.timeline import MAX_INDEX, NUM_BINS
from grounding.answer_format.tokens import IGNORE_INDEX, OFFSET, SEG_END, SEG_START
from lightning_modules.aux_head import AUX_LOSSES, AuxHead, distance_loss, giou_loss, l1_loss
from lightning_modules.generation import Decoder, generate
from lightning_modules.language_model import LoraSpec
from tests import helpers

# ---- aux head ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", AUX_LOSSES)
def test_aux_gradient_reaches_the_head(loss):
    torch.manual_seed(0)
    head = AuxHead(helpers.HIDDEN, "mlp", loss)
    hidden = torch.randn(6, helpers.HIDDEN, requires_grad=True)
    target = torch.tensor([[0.1, 0.4], [0.2, 0.9], [0.0, 1.0], [0.5, 0.6], [0.3, 0.3], [0.7, 0.95]])
    segment, logits = head(hidden)
    assert segment.shape == (6, 2) and ((segment >= 0) & (segment <= 1)).all()
    assert (logits is None) == (loss != "distance")
    value = head.loss(segment, logits, target)
    assert value.ndim == 0 and torch.isfinite(value) and value > 0
    value.backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    assert hidden.grad.abs().sum() > 0  # and on into the LM


def test_aux_head_validates_its_arguments():
    with pytest.raises(ValueError, match="aux loss"):
        AuxHead(8, "mlp", "l2")
    with pytest.raises(ValueError, match="kind"):
        AuxHead(8, "transformer", "l1")
    assert isinstance(AuxHead(8, "linear", "l1").net, torch.nn.Linear)


TARGET = torch.tensor([[0.3, 0.6], [0.1, 0.2]])


def shifted(d: float) -> torch.Tensor:
    return (TARGET + d).clamp(0, 1)


def peaked_logits(segment: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax puts (almost) all mass on the bins of ``segment``."""
    logits = torch.full((segment.shape[0], 2, NUM_BINS), -30.0)
    bins = (segment * MAX_INDEX).round().long()
    logits.scatter_(-1, bins.unsqueeze(-1), 30.0)
    return logits


def test_losses_vanish_at_the_truth():
    target = torch.tensor([[3 / 99, 60 / 99], [10 / 99, 20 / 99]])
    assert l1_loss(target, target) == 0
    assert giou_loss(target, target) == pytest.approx(0.0, abs=1e-6)
    assert distance_loss(peaked_logits(target), target) == pytest.approx(0.0, abs=1e-6)
    for name in ("l1", "giou", "l1_giou"):
        assert AuxHead(8, "mlp", name).loss(target, None, target) == pytest.approx(0.0, abs=1e-6)


def test_losses_grow_with_the_distance():
    shifts = [0.0, 0.05, 0.1, 0.2, 0.35]
    for loss in (l1_loss, giou_loss):
        values = [float(loss(shifted(d), TARGET)) for d in shifts]
        assert values == sorted(values) and len(set(values)) == len(values), (loss, values)
    target = (TARGET * MAX_INDEX).round() / MAX_INDEX
    values = [float(distance_loss(peaked_logits(shifted(d)), target)) for d in shifts]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert values[1] == pytest.approx(2 * 5 / MAX_INDEX, abs=1e-3)  # 2 ends x 5 bins, mean over rows


def test_giou_still_separates_disjoint_predictions():
    target = torch.tensor([[0.1, 0.2]])
    near, far = torch.tensor([[0.3, 0.4]]), torch.tensor([[0.8, 0.9]])
    assert giou_loss(near, target) < giou_loss(far, target)
    assert giou_loss(torch.tensor([[0.2, 0.1]]), target) == pytest.approx(0.0, abs=1e-6)  # ends ordered


@pytest.mark.parametrize("loss", AUX_LOSSES)
def test_zero_offset_rows_give_a_zero_finite_loss(loss):
    head = AuxHead(helpers.HIDDEN, "mlp", loss)
    hidden = torch.zeros(0, helpers.HIDDEN, requires_grad=True)
    segment, logits = head(hidden)
    value = head.loss(segment, logits, torch.zeros(0, 2))
    assert value.ndim == 0 and float(value) == 0.0 and torch.isfinite(value)
    value.backward()
    for p in head.parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any())


# ---- module losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("aux_loss", AUX_LOSSES)
def test_losses_with_aux(aux_loss):
    module = helpers.module(refine_steps=3, aux_loss=aux_loss, aux_weight=0.5)
    batch = helpers.batch(refine_steps=3, n=3)
    losses = module._losses(batch)
    assert set(losses) == {"lm_loss", "aux_loss", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["aux_loss"] > 0
    assert torch.allclose(losses["loss"], losses["lm_loss"] + 0.5 * losses["aux_loss"])
    losses["loss"].backward()
    head_grads = [p.grad for p in module.model.aux_head.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)


def test_aux_reads_the_hidden_state_at_every_offset():
    module = helpers.module(refine_steps=2, aux_loss="l1")
    batch = helpers.batch(refine_steps=2, n=2)
    offset = helpers.tokenizer().convert_tokens_to_ids(OFFSET)
    assert ((batch["input_ids"] == offset).sum(1) == 3).all()  # K + 1 offsets per answer
    out = module.model(batch["input_ids"], batch["attention_mask"], batch["features"], batch["labels"])
    at = batch["input_ids"] == offset
    segment, _ = module.model.aux_head(out.hidden_states[-1][at])
    rows = at.nonzero()[:, 0]
    expected = (segment - batch["gt_norm"][rows]).abs().sum(-1).mean()
    assert torch.allclose(module._losses(batch)["aux_loss"], expected)


def test_direct_batches_give_only_the_lm_loss():
    module = helpers.module(refine_steps=0, aux_loss="l1", aux_weight=1.0)
    assert module.model.aux_head is None
    losses = module._losses(helpers.batch(refine_steps=0, n=3))
    assert set(losses) == {"lm_loss", "loss"}
    assert torch.isfinite(losses["loss"]) and torch.equal(losses["loss"], losses["lm_loss"])


def test_batch_without_offsets_gives_a_zero_aux_loss():
    module = helpers.module(refine_steps=3, aux_loss="giou")
    losses = module._losses(helpers.batch(refine_steps=0, n=2))  # no <OFFSET> in these answers
    assert float(losses["aux_loss"]) == 0.0
    assert torch.isfinite(losses["loss"]) and torch.allclose(losses["loss"], losses["lm_loss"])
    losses["loss"].backward()


def test_lm_loss_only_reads_answer_tokens():
    module = helpers.module(refine_steps=1, aux_weight=0.0)
    batch = helpers.batch(refine_steps=1, n=6)
    assert (batch["attention_mask"] == 0).any()
    base = module._losses(batch)["lm_loss"]
    other = dict(batch)
    other["features"] = batch["features"].clone()
    # Changing the padded tail of the inputs changes nothing (attention mask and labels ignore it).
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = helpers.tokenizer().convert_tokens_to_ids("a")
    other["input_ids"] = ids
    assert torch.allclose(module._losses(other)["lm_loss"], base, atol=1e-6)


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8, dropout=0.0)])
def test_lm_loss_on_the_answer_positions_equals_the_loss_on_every_position(lora):
    module = helpers.module(refine_steps=2, aux_weight=0.0, lora=lora)
    batch = helpers.batch(refine_steps=2, n=5)
    assert (batch["attention_mask"] == 0).any()  # padded rows: answers end at different positions
    model = module.model
    loss = module._losses(batch)["lm_loss"]
    prompt = batch["attention_mask"].bool() & (batch["labels"] == IGNORE_INDEX)
    embeds = model.embed(batch["input_ids"], batch["features"], prompt)
    everywhere = model.lm(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    torch.testing.assert_close(loss, everywhere.loss, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, model.projector.net[0].weight)
    (expected,) = torch.autograd.grad(everywhere.loss, model.projector.net[0].weight)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    scored = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert (
        model(batch["input_ids"], batch["attention_mask"], batch["features"], batch["labels"]).logits.shape[0]
        == scored
        < batch["attention_mask"].sum()
    )  # the output layer ran only where an answer token follows


def test_training_step_logs_the_aux_loss():
    module = helpers.module(refine_steps=2, aux_loss="l1")
    collator = helpers.collator(refine_steps=2)
    data = helpers.dataset()
    loader = DataLoader([data[(0, i)] for i in range(8)], batch_size=4, collate_fn=collator)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/lm_loss", "train/aux_loss"} <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in ("train/loss", "train/lm_loss", "train/aux_loss"))
    assert trainer.global_step == 2


# ---- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_constrained_decoding_always_parses(k):
    tok = helpers.tokenizer()
    model = helpers.video_llm(refine_steps=k, aux_loss="l1", seed=k).eval()
    batch = helpers.batch(refine_steps=k, n=4)
    codec = helpers.codec(k)
    offset = tok.convert_tokens_to_ids(OFFSET) if k else None
    generation = generate(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], tok.eos_token_id, 0,
        slots=codec.slots(), offset_id=offset,
    )  # fmt: skip
    assert len(generation.tokens) == 4
    for tokens in generation.tokens:
        assert len(tokens) == codec.answer_length()
        steps = parse_answer(tok.decode(tokens, skip_special_tokens=False))
        assert len(steps) == k + 1
        assert codec.encode(steps) == tokens  # the layout is exactly the training layout
    if k:
        assert generation.has_offset.all()
        assert generation.offset_hidden.shape == (4, helpers.HIDDEN)
        assert torch.isfinite(generation.offset_hidden).all() and generation.offset_hidden.any()
    else:
        assert not generation.has_offset.any()


def greedy_without_cache(model, prompt: list[int], features: torch.Tensor, steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tensor = torch.tensor([ids])
            out = model.lm(inputs_embeds=model.embed(tensor, features[None]), use_cache=False)
            ids.append(int(out.logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_free_decoding_matches_uncached_greedy_and_respects_the_budget():
    tok = helpers.tokenizer()
    model = helpers.video_llm(refine_steps=0, seed=3).eval()
    batch = helpers.batch(refine_steps=0, n=3)
    assert len(set(batch["prompt_mask"].sum(1).tolist())) > 1  # left padding is exercised
    budget = 6
    # An EOS id no model output will hit, so every row runs to the budget.
    generation = generate(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], eos_id=-1, max_new_tokens=budget
    )
    for row in range(3):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
        assert generation.tokens[row] == greedy_without_cache(model, prompt, batch["features"][row], budget)
    assert all(len(t) == budget for t in generation.tokens)
    assert all(0 <= i < len(tok) for t in generation.tokens for i in t)
    assert generation.offset_hidden is None


def test_free_decoding_stops_at_eos():
    model = helpers.video_llm(refine_steps=0, seed=3).eval()
    batch = helpers.batch(refine_steps=0, n=3)
    first = generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], -1, 4).tokens
    eos = first[0][1]  # pretend the second token of row 0 is the end of sequence
    tokens = generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], eos, 4).tokens
    assert tokens[0] == first[0][:1]
    for row in range(3):
        expected = first[row][: first[row].index(eos)] if eos in first[row] else first[row]
        assert tokens[row] == expected
        assert len(tokens[row]) <= 4


def next_logits(model, ids: list[int], features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.lm(inputs_embeds=model.embed(torch.tensor([ids]), features[None])).logits[0, -1]


def constrained_without_cache(model, prompt: list[int], features: torch.Tensor, slots) -> list[int]:
    """One row, a full forward pass per token: fixed runs copied, each choice slot's tokens picked
    one by one as the best next token among the choices that continue what was picked."""
    ids = list(prompt)
    for slot in slots:
        if slot.fixed:
            ids += slot.fixed
            continue
        picked: tuple[int, ...] = ()
        while picked not in slot.choices:
            following = {c[len(picked)] for c in slot.choices if c[: len(picked)] == picked}
            logits = next_logits(model, ids, features)
            best = max(following, key=lambda token: logits[token])
            picked += (best,)
            ids.append(best)
    return ids[len(prompt) :]


def test_constrained_decoding_walks_choices_of_different_lengths_like_one_row_at_a_time():
    """Tokenizers may spell some numbers in fewer tokens than others: rows whose choice is complete
    wait, masked out, while the others go on; every row gets what decoding it alone gives."""
    tok = helpers.tokenizer()
    model = helpers.video_llm(refine_steps=0, seed=0).eval()
    batch = helpers.batch(refine_steps=0, n=6)
    prompts = [
        ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)
    ]
    start = tok.convert_tokens_to_ids(SEG_START)
    logits = torch.stack(
        [next_logits(model, [*p, start], f) for p, f in zip(prompts, batch["features"], strict=True)]
    )
    # Two tokens the rows rank differently, so that rows take choices of different lengths.
    x, y = next(
        (x, y)
        for x, y in itertools.combinations(logits[0].topk(50).indices.tolist(), 2)
        if 0 < int((logits[:, x] > logits[:, y]).sum()) < len(prompts)
    )
    a, b, c, d = (tok.convert_tokens_to_ids(t) for t in "abcd")
    slots = [
        Slot(fixed=(start,)),
        Slot(choices=((x,), (y, a, b), (y, c))),
        Slot(fixed=(d,)),
        Slot(choices=((a, b, c), (x,), (b, c), (y,))),
    ]
    tokens = generate(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], -1, 0, slots=slots
    ).tokens
    assert len({len(t) for t in tokens}) > 1
    for row, prompt in enumerate(prompts):
        assert tokens[row] == constrained_without_cache(model, prompt, batch["features"][row], slots)


def test_a_masked_out_feed_leaves_the_row_as_if_it_had_not_been_fed():
    """The cache and logits after feeds where some rows sit out equal each row decoded alone."""
    model = helpers.video_llm(refine_steps=0, seed=1).eval()
    batch = helpers.batch(refine_steps=0, n=3)
    prompts = [
        ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)
    ]
    decoder = Decoder(model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], None)
    feeds = [
        ([5, 6, 7], [True, False, True]),
        ([8, 9, 10], [False, False, True]),
        ([11, 12, 13], [True, False, False]),
    ]
    written = [list(p) for p in prompts]
    with torch.no_grad():
        for tokens, fed in feeds:
            decoder.feed(torch.tensor(tokens)[:, None], torch.tensor(fed))
            for row in range(3):
                written[row] += [tokens[row]] if fed[row] else []
    for row in range(3):
        expected = next_logits(model, written[row], batch["features"][row])
        assert torch.allclose(decoder.last_logits[row], expected, atol=1e-4)


def test_module_predicts_parsed_segments():
    module = helpers.module(refine_steps=2, aux_loss="l1", final="mean")
    batch = helpers.batch(refine_steps=2, n=3, split="val")
    module.eval()
    predictions = module.predict_batch(batch)
    assert len(predictions) == 3
    for prediction in predictions:
        assert SEG_START in prediction.text and SEG_END in prediction.text
        assert len(prediction.segments) == 4 and prediction.final is not None
        assert all(0 <= x <= MAX_INDEX for x in prediction.final)


def test_an_aux_answer_to_a_text_that_did_not_parse_counts_in_parse_fail(monkeypatch):
    """Before: with ``inference.final=aux`` the head's answer hid the text's failure: parse_fail 0."""
    module = helpers.module(refine_steps=1, aux_loss="l1", final="aux")
    batch = helpers.batch(refine_steps=1, n=2, split="val")
    garbage = Prediction("From <SEG_START> 2 <SEG_END>", [], (10.0, 50.0), "aux")
    monkeypatch.setattr(module, "predict_batch", lambda batch: [garbage] * 2)
    module._evaluate(batch, "val")
    scores = module.metrics["val"].compute()
    assert scores["parse_fail"] == 100.0 and scores["mIoU"] > 0


def test_an_evaluation_loss_that_is_nan_shows_as_nan():
    """val/loss and test/loss are weighted means over batches (right under DDP with uneven shares); a
    NaN batch must not be dropped with a warning, which would make a diverging evaluation look fine
    (found by review)."""
    losses = helpers.module(refine_steps=1).losses["val"]
    losses.update(torch.tensor(1.0), weight=3)
    losses.update(torch.tensor(2.0), weight=1)
    assert losses.compute() == pytest.approx(1.25)  # torchmetrics' MeanMetric without NaN removal: 1.5
    losses.update(torch.tensor(float("nan")), weight=3)
    assert torch.isnan(losses.compute())
