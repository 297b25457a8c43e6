"""The method's output format, in one place: what the model is trained to write and how it is read.

Three counts follow from K = ``model.refine.steps``, and each has one name:

- ``RefineSchedule.steps``: K, the refinement steps (0 = direct answers, no offsets).
- ``RefineSchedule.num_rounds`` = K + 1 target rounds (:class:`RefineRound`: a coarse segment and
  its offsets); ``<RETHINK>`` separates them in the answer.
- ``RefineSchedule.num_segments`` = K + 2 predicted segments (1 for direct answers): the first
  coarse segment, then each round's refined one. They are scored one by one as ``step{k}/mIoU``
  and written as ``steps`` in ``predictions/test.jsonl``; the last is the final answer.

One ``RefineSchedule`` is built from the config and one :class:`AnswerCodec` (tokenizer + schedule)
serves the collator (targets) and the module (decoding, parsing, metrics).

Modules:

- ``tokens``: ``<video>``, the markers, digits and signs, ``IGNORE_INDEX``.
- ``timeline``: the timeline conventions (``data.timeline``): seconds <-> frame indices 00-99, frame places.
- ``targets``: ``RefineSchedule``, ``RefineRound`` and drawing the target rounds (index or seconds space).
- ``layout``: rounds <-> answer text (atoms), parsing, the predicted segments.
- ``codec``: answer <-> token ids (``model.answer_tokens``: digit by digit, or canonical), and the
  slots of constrained decoding (``slots``); ``canonical`` finds the slots of the tokenizer's own
  spelling of the numbers.
- ``prompts``: query normalisation, the named prompts and prompt rendering.
- ``chat``: chat formats (``data.chat_template``): the prompt as a user turn, BOS, the answer's end token.
- ``corpus``: the text a locally trained tokenizer learns from.
- ``predictions``: generated text -> predicted segments, the final-answer choice, prediction rows.
"""
