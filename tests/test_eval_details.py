"""Evaluation details of the official code, as switches: the aux head read at every <OFFSET> and
averaged (``model.inference.final=aux_all`` / ``mean_all``), and segments scored as written
(``model.inference.order_and_clip=false``); answers that do not depend on the batch size; and the
steps an answer did not reach, scored 0 under every protocol."""

from __future__ import annotations

import pytest
import torch

from grounding.answer_format.predictions import Prediction, predict, seconds
from grounding.answer_format.timeline import VTIMELLM100
from grounding.answer_format.tokens import OFFSET
from grounding.metrics.iou import temporal_iou
from grounding.metrics.protocols import PROTOCOLS
from lightning_modules.decoding import InferenceSpec
from lightning_modules.generation import generate
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.hf_generation import hf_generate
from lightning_modules.optimization import OptimSpec
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


@pytest.mark.parametrize("protocol", ["exact", "parsed_only"])
def test_a_step_an_answer_did_not_reach_scores_0(monkeypatch, protocol):
    """Row 1 stops after its first refined segment, row 2 does not parse. Before: under parsed_only
    the steps row 1 did not reach left its step<k>/mIoU's denominator (README: they count as IoU 0),
    so each step was averaged over other answers than the final score."""
    tiny = helpers.module(refine_steps=3)
    module = GroundingModule(
        tiny.model, tiny.codec, 1.0, OptimSpec(), InferenceSpec(), protocol=PROTOCOLS[protocol]
    )
    batch = helpers.batch(refine_steps=3, n=4, split="test")
    written = [[(10.0, 60.0)] * 5, [(20.0, 50.0)] * 2, [], [(0.0, 90.0)] * 5]
    monkeypatch.setattr(module, "predict_batch", lambda _: [Prediction("", s, None) for s in written])
    module._evaluate(batch, "test")
    iou = [
        float(temporal_iou(torch.tensor([seconds(s[-1], r.duration)]), torch.tensor([[r.start, r.end]])))
        if s
        else 0.0
        for s, r in zip(written, batch["records"], strict=True)
    ]
    queries = 3 if protocol == "parsed_only" else 4
    steps = [metric.compute()["mIoU"] for metric in module.segment_metrics["test"]]
    assert module.metrics["test"].compute()["mIoU"] == pytest.approx(100 * sum(iou) / queries)
    assert steps[0] == steps[1] == pytest.approx(100 * sum(iou) / queries)
    assert steps[2] == steps[4] == pytest.approx(100 * (iou[0] + iou[3]) / queries)
