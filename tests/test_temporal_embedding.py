"""How frame tokens learn their place on the 00-99 timeline: learned embeddings, the LM's digit
embeddings, or the index written before each one in the prompt."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from datamodules.collate import GroundingCollator
from grounding.answer_format.prompt_ids import timestamp_length, video_span, video_timestamps
from grounding.answer_format.prompts import DEFAULT_TEMPLATE, render_prompt
from grounding.answer_format.targets import RefineRound
from grounding.answer_format.timeline import DEFAULT_TIMELINE
from grounding.answer_format.tokens import VIDEO
from lightning_modules.language_model import build_tiny_lm
from lightning_modules.projector import FrameProjector
from lightning_modules.video_llm import VideoLLM, frame_index_ids, stamp_positions
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


def test_text_timestamps_precede_each_video_token_in_the_answers_own_ids():
    codec = helpers.codec()
    stamps = video_timestamps(codec, 12, DEFAULT_TIMELINE)
    collator = GroundingCollator(codec, partial(render_prompt, DEFAULT_TEMPLATE), 12, video_stamps=stamps)
    ids, video = collator.prompt_ids("a person opens a door"), collator.video_id
    at = [i for i, token in enumerate(ids) if token == video]
    assert len(at) == 12
    written = [codec.tokenizer.decode(ids[i - 2 : i]) for i in at]
    assert written == [f"{round(i * 99 / 11):02d}" for i in range(12)]
    # The ids a stamp copies are those an answer writes for that number.
    answer = codec.encode([RefineRound(36, 68)])
    assert any(answer[i : i + 2] == codec.number_ids(36) for i in range(len(answer)))


def test_the_query_the_projector_reads_leaves_the_timestamps_out():
    """A query-conditioned projector reads the mean of the prompt's text embeddings: with text
    timestamps (stamp_length 2) it is the same as without them."""
    tok, codec = helpers.tokenizer(), helpers.codec()
    torch.manual_seed(0)
    projector = FrameProjector("linear", 16, helpers.HIDDEN, 12, query_size=helpers.HIDDEN)
    model = VideoLLM(
        build_tiny_lm(helpers.TINY, tok), projector, tok.convert_tokens_to_ids(VIDEO), stamp_length=2
    )
    plain, stamped = (
        GroundingCollator(
            codec, partial(render_prompt, DEFAULT_TEMPLATE), 12, video_stamps=stamps
        ).prompt_ids("a person opens a door")
        for stamps in (None, video_timestamps(codec, 12, DEFAULT_TIMELINE))
    )
    queries = []
    projector.register_forward_hook(lambda _, args, __: queries.append(args[1]))
    # Without timestamps; with them; with them, read by a model that does not know they are there.
    for ids, stamp_length in ((plain, 0), (stamped, 2), (stamped, 0)):
        model.stamp_length = stamp_length
        model.embed(torch.tensor([ids]), torch.randn(1, 12, 16), torch.ones(1, len(ids)))
    torch.testing.assert_close(queries[1], queries[0])
    assert not torch.allclose(queries[2], queries[0])


def test_stamp_positions_are_the_tokens_before_each_placeholder():
    placeholders = torch.tensor([[0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    expected = [[1, 1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0]]
    assert stamp_positions(placeholders, 2).int().tolist() == expected
    assert not stamp_positions(placeholders, 0).any()


def test_video_span_needs_one_timestamp_per_video_token():
    assert video_span(7, 3) == [7, 7, 7]
    assert video_span(7, 2, [[1, 2], [3, 4]]) == [1, 2, 7, 3, 4, 7]
    with pytest.raises(ValueError, match="3 timestamps for 2 video tokens"):
        video_span(7, 2, [[1], [2], [3]])


class _RaggedNumbers:
    """A codec whose numbers take one token below 50 and two from 50 (as some tokenizers write them)."""

    answer_tokens = "canonical"

    def number_ids(self, value: int) -> list[int]:
        return [value] if value < 50 else [value, value]


def test_text_timestamps_refuse_numbers_of_different_lengths():
    assert timestamp_length(helpers.codec()) == 2
    with pytest.raises(ValueError, match=r"in \[1, 2\] tokens: use answer_tokens=digits"):
        timestamp_length(_RaggedNumbers())
    with pytest.raises(ValueError, match="a timestamp is 00-99"):
        helpers.codec().number_ids(100)
