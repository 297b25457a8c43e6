"""How frame tokens learn their place on the 00-99 timeline: learned embeddings or the LM's digit embeddings."""

from __future__ import annotations

import torch

from grounding.answer_format.tokens import VIDEO
from lightning_modules.language_model import build_tiny_lm
from lightning_modules.projector import FrameProjector
from lightning_modules.video_llm import VideoLLM, frame_index_ids
from tests import helpers


def _model(mode: str, num_frames: int = 12) -> VideoLLM:
    tok = helpers.tokenizer()
    torch.manual_seed(0)
    lm = build_tiny_lm(helpers.TINY, tok)
    projector = FrameProjector("linear", 16, helpers.HIDDEN, num_frames, temporal_embedding=mode == "learned")
    ids = frame_index_ids(tok, num_frames) if mode == "digits" else None
    return VideoLLM(lm, projector, tok.convert_tokens_to_ids(VIDEO), None, ids)


def test_frame_index_ids_spell_each_frames_index():
    tok = helpers.tokenizer()
    ids = frame_index_ids(tok, 12)
    spelled = ["".join(tok.convert_ids_to_tokens(row.tolist())) for row in ids]
    assert spelled[0] == "00" and spelled[-1] == "99"
    assert spelled == [f"{round(i * 99 / 11):02d}" for i in range(12)]


def test_digit_mode_adds_the_gated_digit_embeddings():
    model = _model("digits")
    features = torch.randn(1, 12, 16)
    frames = model.frame_embeddings(features)
    table = model.lm.get_input_embeddings().weight
    expected = model.projector(features)[0] + (table[model.frame_index_ids] * model.digit_gate).sum(1)
    torch.testing.assert_close(frames[0], expected)
    # Two frames with identical features differ exactly by their digit embeddings.
    same = torch.zeros(1, 12, 16)
    out = model.frame_embeddings(same)[0]
    assert not torch.allclose(out[0], out[5])


def test_digit_gate_and_digit_rows_receive_gradients():
    model = _model("digits")
    model.frame_embeddings(torch.randn(2, 12, 16)).pow(2).sum().backward()
    assert model.digit_gate.grad is not None and model.digit_gate.grad.abs().sum() > 0
    digit_rows = model.frame_index_ids.unique()
    grad = model.lm.get_input_embeddings().weight.grad
    assert grad[digit_rows].abs().sum() > 0


def test_learned_and_none_modes():
    learned, plain = _model("learned"), _model("none")
    zeros = torch.zeros(1, 12, 16)
    out = learned.frame_embeddings(zeros)[0]
    torch.testing.assert_close(out - learned.projector.net(zeros)[0], learned.projector.time.weight)
    flat = plain.frame_embeddings(zeros)[0]
    torch.testing.assert_close(flat[0], flat[7])  # nothing tells the frames apart
