"""The Video LLM: projected frame features spliced into the LM's input at the <video> placeholders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.prompt_ids import timestamp_length, video_placeholder_id
from grounding.answer_format.timeline import DEFAULT_TIMELINE, Timeline
from grounding.answer_format.tokens import IGNORE_INDEX
from lightning_modules.aux_head import AuxHead, AuxSpec
from lightning_modules.projector import TEMPORAL_EMBEDDINGS, FrameProjector, ProjectorSpec, video_token_count


def answer_loss_inputs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the LM's next-token logits are scored and against what: (B, T) bool, the positions whose
    next label is not ignored, and the labels they predict, in the same (row-major) order."""
    following = labels[:, 1:]
    scored = torch.cat([following != IGNORE_INDEX, following.new_zeros(len(labels), 1, dtype=torch.bool)], 1)
    return scored, following[following != IGNORE_INDEX]


def frame_index_ids(
    tokenizer: PreTrainedTokenizerBase, video_tokens: int, timeline: Timeline = DEFAULT_TIMELINE
) -> torch.Tensor:
    """The tens and ones digit token of each video token's index on ``timeline``, (tokens, 2)."""
    indices = [timeline.frame_index(i, video_tokens) for i in range(video_tokens)]
    return torch.tensor([tokenizer.convert_tokens_to_ids(list(f"{i:02d}")) for i in indices])


def stamp_positions(placeholders: torch.Tensor, stamp_length: int) -> torch.Tensor:
    """(B, T) bool: the ``stamp_length`` positions before each placeholder, where a prompt with text
    timestamps writes the video token's index."""
    stamps = torch.zeros_like(placeholders)
    for back in range(1, stamp_length + 1):
        stamps[:, :-back] |= placeholders[:, back:]
    return stamps


class VideoLLM(nn.Module):
    """LM + projector (+ optional aux head). Each sample's prompt holds one placeholder per video
    token the projector makes.

    ``frame_index_ids`` ((video tokens, 2): the tens and ones digit token of each one's 00-99 index)
    adds to every video token the LM's own embeddings of its index digits, gated per digit
    position, so the frame a timestamp should name looks like that timestamp to the LM.
    ``stamp_length``: the tokens of the text timestamp before each video token (0: none), which the
    query-conditioned projector leaves out of the query's mean.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        projector: nn.Module,
        video_token_id: int,
        aux_head: nn.Module | None = None,
        frame_index_ids: torch.Tensor | None = None,
        saliency_head: nn.Module | None = None,
        stamp_length: int = 0,
    ) -> None:
        super().__init__()
        self.stamp_length = stamp_length
        self.lm, self.projector, self.aux_head = lm, projector, aux_head
        self.saliency_head = saliency_head
        self.video_token_id = video_token_id
        self.register_buffer("frame_index_ids", frame_index_ids, persistent=False)
        hidden = lm.config.hidden_size
        self.digit_gate = nn.Parameter(torch.ones(2, hidden)) if frame_index_ids is not None else None

    @classmethod
    def from_config(
        cls,
        lm: PreTrainedModel,
        codec: AnswerCodec,
        projector: ProjectorSpec,
        aux: AuxSpec,
        saliency_weight: float,
        feature_dim: int,
        num_frames: int,
        timeline: Timeline = DEFAULT_TIMELINE,
    ) -> VideoLLM:
        """The Video LLM a config describes around ``lm``: the projector, the aux head (when its
        weight is on and answers have offsets), the digit time embeddings, the saliency head.
        Raises ValueError for a combination that cannot work."""
        if projector.temporal_embedding not in TEMPORAL_EMBEDDINGS:
            raise ValueError(
                f"temporal_embedding={projector.temporal_embedding!r}: choose {TEMPORAL_EMBEDDINGS}"
            )
        if saliency_weight > 0 and not projector.query_conditioned:
            raise ValueError("a saliency loss needs a query-conditioned projector")
        hidden = lm.config.hidden_size
        # Built in this order (aux head, projector, saliency head) so a seed gives the same weights.
        with_aux = aux.weight > 0 and codec.schedule.with_offsets
        aux_head = AuxHead(hidden, aux.head, aux.loss, aux.scaling, timeline) if with_aux else None
        frames = FrameProjector.from_spec(projector, feature_dim, hidden, num_frames)
        video_tokens = video_token_count(num_frames, projector.frames_per_token)
        return cls(
            lm,
            frames,
            video_placeholder_id(codec.tokenizer),
            aux_head=aux_head,
            frame_index_ids=(
                frame_index_ids(codec.tokenizer, video_tokens, timeline)
                if projector.temporal_embedding == "digits"
                else None
            ),
            saliency_head=nn.Linear(hidden, 1) if saliency_weight > 0 else None,
            stamp_length=timestamp_length(codec) if projector.temporal_embedding == "text" else 0,
        )

    def frame_embeddings(
        self, features: torch.Tensor, query: torch.Tensor | None = None, tokens_fixed: bool = False
    ) -> torch.Tensor:
        """The video tokens, computed in the projector's dtype (the LM's may be lower: ``lm.dtype``);
        ``tokens_fixed``: the LM's embeddings of the index digits as constants."""
        dtype = next(self.projector.parameters()).dtype
        frames = self.projector(features.to(dtype), None if query is None else query.to(dtype))
        if self.frame_index_ids is not None:
            digits = self.lm.get_input_embeddings()(self.frame_index_ids[: frames.shape[1]])
            digits = digits.detach() if tokens_fixed else digits
            frames = frames + (digits * self.digit_gate.to(digits.dtype)).sum(1)
        return frames

    def embed(
        self, input_ids: torch.Tensor, features: torch.Tensor | None, prompt_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the placeholders replaced, in order, by the projected frames.
        ``prompt_mask`` marks the prompt (not padding, not the answer); a query-conditioned
        projector reads the mean embedding of its text tokens."""
        return self._embed_with_frames(input_ids, features, prompt_mask)[0]

    def _embed_with_frames(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor | None,
        prompt_mask: torch.Tensor | None,
        tokens_fixed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        placeholders = input_ids == self.video_token_id  # may lie outside the vocabulary (VIDEO_INDEX)
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        embeds = embeds.detach() if tokens_fixed else embeds
        if features is None:
            if placeholders.any():
                raise ValueError("input holds <video> placeholders but no features were given")
            return embeds, None
        query = None
        if getattr(self.projector, "film", None) is not None:
            if prompt_mask is None:
                raise ValueError("a query-conditioned projector needs the prompt mask")
            text = prompt_mask.bool() & ~placeholders & ~stamp_positions(placeholders, self.stamp_length)
            text = text.unsqueeze(-1).to(embeds.dtype)
            query = (embeds * text).sum(1) / text.sum(1).clamp(min=1)
        frames = self.frame_embeddings(features, query, tokens_fixed)
        per_sample = placeholders.sum(dim=1)
        if not torch.all(per_sample == frames.shape[1]):
            raise ValueError(
                f"each sample needs {frames.shape[1]} <video> placeholders (one per video token), "
                f"got {per_sample.tolist()}"
            )
        return embeds.masked_scatter(placeholders.unsqueeze(-1), frames.to(embeds.dtype)), frames

    def saliency_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """(B, video tokens): the saliency head's logits from the projector alone, without the LM's
        pass (the projector's first steps, ``model.saliency.projector_steps``). Token embeddings that
        train and are tied to the output layer are read as constants: this loss alone would move the
        LM's output layer."""
        prompt = attention_mask.bool() & (labels == IGNORE_INDEX)
        frames = self._embed_with_frames(input_ids, features, prompt, self.trains_tied_embeddings())[1]
        return self.saliency(frames)

    def saliency(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, video tokens) saliency logits of the video tokens' embeddings, read in the head's own
        dtype (fp32 beside a bf16 LM; bf16 under ``trainer.precision=bf16-true``)."""
        return self.saliency_head(frames.to(self.saliency_head.weight.dtype)).squeeze(-1)

    def trains_tied_embeddings(self) -> bool:
        """Whether the LM's input embeddings train and are its output layer too."""
        inputs, outputs = self.lm.get_input_embeddings(), self.lm.get_output_embeddings()
        weight = getattr(inputs, "weight", None)
        return weight is not None and weight.requires_grad and getattr(outputs, "weight", None) is weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ):
        """The LM's output with all hidden states when there is an aux head. With ``labels``: the
        loss, the mean next-token cross-entropy over the labelled tokens, and ``logits`` only at the
        positions that predict one (flattened, (labelled tokens, vocabulary)): the output layer runs
        on the answers, not on every prompt and video token. With a saliency head also
        ``saliency_logits`` (B, video tokens): does each video token show the query?"""
        prompt = attention_mask.bool() if labels is None else attention_mask.bool() & (labels == IGNORE_INDEX)
        embeds, frames = self._embed_with_frames(input_ids, features, prompt)
        scored, targets = answer_loss_inputs(labels) if labels is not None else (None, None)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            output_hidden_states=self.aux_head is not None,
            use_cache=False,
            **({"logits_to_keep": scored} if scored is not None else {}),
        )
        if targets is not None:
            out["loss"] = F.cross_entropy(out.logits.float(), targets)
        if self.saliency_head is not None and frames is not None:
            out["saliency_logits"] = self.saliency(frames)
        return out
