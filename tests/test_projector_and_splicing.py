"""The Video LLM's input side: projector (merged frames, FiLM query conditioning), frame splicing,
the prompt's query embedding, saliency targets."""

from __future__ import annotations

import pytest
import torch

from grounding.answer_format.tokens import IGNORE_INDEX, VIDEO
from lightning_modules.generation import generate
from lightning_modules.grounding_module import saliency_targets
from lightning_modules.projector import FrameProjector
from tests import helpers

# ---- projector -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector_shapes(kind):
    projector = FrameProjector(kind, 16, 32)
    assert projector(torch.randn(3, 8, 16)).shape == (3, 8, 32)
    assert projector(torch.randn(5, 16)).shape == (5, 32)
    layers = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == (1 if kind == "linear" else 2)


def test_merged_frames_make_one_token_each():
    projector = FrameProjector("mlp", 4, 8, num_frames=6, temporal_embedding=True, frames_per_token=3)
    features = torch.randn(2, 6, 4)
    tokens = projector(features)
    assert tokens.shape == (2, 2, 8)
    expected = projector.net(features[:, :3].reshape(2, 12)) + projector.time.weight[0]
    assert torch.allclose(tokens[:, 0], expected)  # frames 0-2, concatenated, then projected
    changed = features.clone()
    changed[:, 4] += 1.0
    after = projector(changed)
    assert torch.equal(after[:, 0], tokens[:, 0]) and not torch.allclose(after[:, 1], tokens[:, 1])


def test_frames_that_do_not_fill_the_last_token_are_zero_padded():
    projector = FrameProjector("linear", 4, 8, num_frames=10, frames_per_token=3)
    frames = torch.randn(2, 10, 4)
    tokens = projector(frames)
    assert tokens.shape == (2, 4, 8)
    last = torch.cat([frames[:, 9], torch.zeros(2, 8)], dim=-1)
    torch.testing.assert_close(tokens[:, 3], projector.net(last))
    torch.testing.assert_close(tokens[:, :3], projector(frames[:, :9])[:, :3])


def test_unknown_projector_raises():
    with pytest.raises(ValueError, match="qformer"):
        FrameProjector("qformer", 16, 32)


# ---- frame splicing ------------------------------------------------------------------------------


def test_embed_splices_projected_frames_in_order():
    model = helpers.video_llm(refine_steps=0)
    batch = helpers.batch(refine_steps=0, n=3)
    ids, features = batch["input_ids"], batch["features"]
    video = helpers.tokenizer().convert_tokens_to_ids(VIDEO)
    with torch.no_grad():
        embeds = model.embed(ids, features)
        table = model.lm.get_input_embeddings()(ids)
        frames = model.projector(features)
    assert embeds.shape == (*ids.shape, helpers.HIDDEN)
    for row in range(ids.shape[0]):
        at = (ids[row] == video).nonzero().flatten()
        assert torch.allclose(embeds[row, at], frames[row])  # frame i at the i-th placeholder
        others = ids[row] != video
        assert torch.equal(embeds[row, others], table[row, others])
    # Frames really are distinct, so the order check above means something.
    assert not torch.allclose(frames[0, 0], frames[0, 1])


def test_query_conditioned_projector_starts_unconditioned_and_needs_the_query():
    plain = FrameProjector("mlp", 4, 8, num_frames=6)
    film = FrameProjector("mlp", 4, 8, num_frames=6, query_size=8)
    film.net.load_state_dict(plain.net.state_dict())
    features, query = torch.randn(2, 6, 4), torch.randn(2, 8)
    assert torch.allclose(film(features, query), plain(features))  # zero-initialized FiLM
    torch.nn.init.normal_(film.film.weight)
    conditioned = film(features, query)
    assert not torch.allclose(conditioned, plain(features))
    assert not torch.allclose(conditioned[0], film(features, query.flip(0))[0])
    with pytest.raises(ValueError, match="query-conditioned"):
        film(features)


def test_the_query_embedding_comes_from_the_prompt_text_only():
    model = helpers.video_llm(refine_steps=0)
    model.projector = FrameProjector(
        "mlp", helpers.SPEC.feature_dim, helpers.HIDDEN, helpers.SPEC.num_frames, query_size=helpers.HIDDEN
    )
    torch.nn.init.normal_(model.projector.film.weight)
    batch = helpers.batch(refine_steps=0, n=2)
    ids, features, labels = batch["input_ids"], batch["features"], batch["labels"]
    prompt = batch["attention_mask"].bool() & (labels == IGNORE_INDEX)
    video = helpers.tokenizer().convert_tokens_to_ids(VIDEO)
    placeholders = ids == video

    def frames(token_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.embed(token_ids, features, prompt)[placeholders].view(2, -1, helpers.HIDDEN)

    base = frames(ids)
    answer_changed, query_changed = ids.clone(), ids.clone()
    answer_changed[labels != IGNORE_INDEX] = ids[0, 0]
    text = (prompt & ~placeholders).nonzero()
    query_changed[tuple(text[-1])] = ids[0, 0]  # the last prompt token of the last row
    assert torch.equal(frames(answer_changed), base)
    changed = frames(query_changed)
    assert torch.equal(changed[0], base[0]) and not torch.allclose(changed[1], base[1])
    with pytest.raises(ValueError, match="prompt mask"):
        model.embed(ids, features)
    # Decoding hands the (left-padded) prompt mask to the projector too.
    generation = generate(model, batch["prompt_ids"], batch["prompt_mask"], features, -1, 3)
    assert [len(tokens) for tokens in generation.tokens] == [3, 3]


def test_saliency_targets_mark_the_tokens_inside_the_truth():
    gt = torch.tensor([[0.2, 0.6], [0.0, 1.0], [0.9, 0.95]])
    assert saliency_targets(gt, 5).tolist() == [[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]


def test_embed_rejects_wrong_placeholder_counts():
    model = helpers.video_llm(refine_steps=0)
    batch = helpers.batch(refine_steps=0, n=2)
    ids, features = batch["input_ids"], batch["features"]
    with pytest.raises(ValueError, match="placeholders"):
        model.embed(ids, features[:, :-1])
    with pytest.raises(ValueError, match="placeholders"):
        model.embed(ids, torch.cat([features, features[:, :1]], dim=1))
    video = helpers.tokenizer().convert_tokens_to_ids(VIDEO)
    broken = ids.clone()
    broken[0, (broken[0] == video).nonzero()[0, 0]] = helpers.tokenizer().convert_tokens_to_ids("a")
    with pytest.raises(ValueError, match="placeholders"):
        model.embed(broken, features)
    with pytest.raises(ValueError, match="no features"):
        model.embed(ids, None)


def test_an_lm_in_bfloat16_embeds_and_decodes_outside_autocast():
    """``model.lm.dtype=bfloat16`` keeps the projector in fp32: frames are projected in the
    projector's dtype and spliced in the LM's, also where no autocast is active (a callback's
    decoding at the end of validation)."""
    model = helpers.video_llm(refine_steps=0)
    model.projector = FrameProjector(
        "mlp", helpers.SPEC.feature_dim, helpers.HIDDEN, helpers.SPEC.num_frames, query_size=helpers.HIDDEN
    )
    model.lm.to(torch.bfloat16)
    batch = helpers.batch(refine_steps=0, n=2)
    prompt = batch["attention_mask"].bool() & (batch["labels"] == IGNORE_INDEX)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["features"], prompt)
    assert embeds.dtype == torch.bfloat16
    generation = generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], -1, 3)
    assert [len(tokens) for tokens in generation.tokens] == [3, 3]
