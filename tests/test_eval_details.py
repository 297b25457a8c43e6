"""Evaluation details of the official code, as switches: the aux head read at every <OFFSET> and
averaged (``model.inference.final=aux_all`` / ``mean_all``), and segments scored as written
(``model.inference.order_and_clip=false``); and answers that do not depend on the batch size."""

from __future__ import annotations

import pytest
import torch

from grounding.answer_format.predictions import predict, seconds
from grounding.answer_format.timeline import VTIMELLM100
from grounding.answer_format.tokens import OFFSET
from grounding.metrics.iou import temporal_iou
from lightning_modules.generation import generate
from lightning_modules.hf_generation import hf_generate
from tests import helpers


@pytest.mark.parametrize("decoder", [generate, hf_generate])
def test_aux_all_is_the_heads_mean_over_every_offset(decoder):
    module = helpers.module(refine_steps=3, final="aux_all", seed=1).eval()
    model, tok, batch = module.model, module.tokenizer, helpers.batch(refine_steps=3, n=3)
    offset = tok.convert_tokens_to_ids(OFFSET)
    generation = decoder(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], tok.eos_token_id, 0,
        slots=module.codec.slots(), offset_id=offset,
    )  # fmt: skip
    last, every = module._aux_segments(generation)
    for row, answer in enumerate(generation.tokens):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():  # the whole answer at once, its hidden states at each <OFFSET>
            hidden = model.lm(
                inputs_embeds=model.embed(ids, batch["features"][row : row + 1]), output_hidden_states=True
            )
            at = [len(prompt) + i for i, token in enumerate(answer) if token == offset]
            heads = model.aux_head(hidden.hidden_states[-1][0, at])[0]
        assert len(at) == 4
        torch.testing.assert_close(torch.tensor(every[row]), heads.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(last[row]), heads[-1], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(heads.mean(0), heads[-1])
    for prediction, mean in zip(module.predict_batch(batch), every, strict=True):  # final=aux_all
        assert prediction.final == pytest.approx(sorted(x * 99 for x in mean), rel=1e-4)


def test_the_final_choices_read_their_aux_segment():
    text = "From <SEG_START> 10 to 30 <OFFSET> +00 and +00 <SEG_END>."
    prediction = predict(text, 2, "mean_all", (0.2, 0.4), aux_all_segment=(0.4, 0.6))
    assert prediction.choose("aux") == pytest.approx((19.8, 39.6))
    assert prediction.choose("aux_all") == pytest.approx((39.6, 59.4))
    assert prediction.final == pytest.approx(((10 + 39.6) / 2, (30 + 59.4) / 2))


def test_segments_scored_as_written_without_order_and_clip():
    """A refined segment that leaves the video, and one whose ends cross: the official evaluation
    scores them as written; the project orders and clips them unless told not to."""
    leaves = "From <SEG_START> 02 to 90 <OFFSET> -05 and +15 <SEG_END>."
    crosses = "From <SEG_START> 60 to 40 <OFFSET> +00 and +00 <SEG_END>."
    duration, truth = 50.0, torch.tensor([[0.0, 49.5]])
    raw = {t: predict(t, 2, "last", None, VTIMELLM100, order_and_clip=False) for t in (leaves, crosses)}
    clipped = {t: predict(t, 2, "last", None, VTIMELLM100) for t in (leaves, crosses)}
    assert raw[leaves].final == (-3, 105) and clipped[leaves].final == (0, 99)
    assert raw[crosses].final == (60, 40) and clipped[crosses].final == (40, 60)

    def iou(prediction, clip):
        return float(
            temporal_iou(torch.tensor([seconds(prediction.final, duration, VTIMELLM100, clip)]), truth)
        )

    # The official IoU on fractions: intersection max(0, min(e, e') - max(s, s')), union max - min.
    assert iou(raw[leaves], False) == pytest.approx((0.99 - 0) / (1.05 + 0.03))
    assert iou(clipped[leaves], True) == pytest.approx(1.0)
    assert iou(raw[crosses], False) == 0.0 and iou(clipped[crosses], True) == pytest.approx(0.2 / 0.99)
