"""Tokenizers: a Hugging Face one by name/path, or a byte-level BPE trained locally on the data's text.

Either way the grounding tokens (``<SEG_START>`` ... and, in the project's style, ``<video>``) are
added as special tokens, in the order and spelling of ``model.lm.grounding_tokens``
(:data:`~grounding.answer_format.tokens.TOKEN_STYLES`), and digits are single tokens so timestamps
are spelled digit by digit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from grounding.answer_format.tokens import DIGITS, MARKERS, SIGNS, TOKEN_STYLES, VIDEO, VIDEO_WHITESPACE
from lightning_modules.pretrained import resolve_pretrained

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_local_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any UTF-8 text encodes) trained on ``texts``, with digits kept apart."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def add_grounding_tokens(
    tokenizer: PreTrainedTokenizerBase, style: str | None = None, video_whitespace: str = "kept"
) -> PreTrainedTokenizerBase:
    """Add the grounding tokens of ``style``; give the tokenizer a pad token if it has none. ``None``:
    the style of the markers the tokenizer holds (a run's saved one: ``reference`` when it has no
    ``<video>``), else ``project``. ``video_whitespace``: ``model.lm.video_whitespace`` (read by
    ``project`` alone: ``reference`` has no ``<video>``). Adding them again restores their spelling,
    which a saved tokenizer may forget (Qwen2's does)."""
    if style is None:
        added = tokenizer.get_added_vocab()
        style = "reference" if set(MARKERS) <= set(added) and VIDEO not in added else "project"
    if style not in TOKEN_STYLES:
        raise ValueError(f"grounding tokens {style!r}: choose from {', '.join(TOKEN_STYLES)}")
    if video_whitespace not in VIDEO_WHITESPACE:
        raise ValueError(f"video whitespace {video_whitespace!r}: choose from {', '.join(VIDEO_WHITESPACE)}")
    # project: spaces around a marker fold into it (shorter answers, the same text once parsed), and
    # around <video> as video_whitespace says; reference: they stay, as the official
    # add_tokens(..., special_tokens=True) keeps them.
    video_folds, markers_fold = video_whitespace == "folded", style == "project"
    folds = {t: (video_folds if t == VIDEO else markers_fold) for t in TOKEN_STYLES[style]}
    tokens = [AddedToken(t, lstrip=fold, rstrip=fold, special=True) for t, fold in folds.items()]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for char in DIGITS + SIGNS:
        if tokenizer.convert_tokens_to_ids(char) in (None, tokenizer.unk_token_id):
            raise ValueError(f"tokenizer has no single token for {char!r}: timestamps cannot be spelled")
    return tokenizer


# The files a saved tokenizer keeps its vocabulary in, one of them at least (fast; slow BPE,
# WordPiece, SentencePiece), or the config that names them.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def tokenizer_folder_error(path: Path) -> str | None:
    """Why the local folder ``path`` holds no tokenizer (transformers would advise installing a
    converter); None when it may, or when ``path`` is no folder (a hub name)."""
    if not path.is_dir() or any((path / name).is_file() for name in VOCABULARY_FILES):
        return None
    return f"the folder holds no tokenizer: none of {', '.join(VOCABULARY_FILES)}"


def build_tokenizer(
    name_or_path: str | None,
    texts: Iterable[str],
    vocab_size: int,
    style: str = "project",
    video_whitespace: str = "kept",
) -> PreTrainedTokenizerBase:
    """The pretrained tokenizer of ``name_or_path``, or a local BPE trained on ``texts`` when it is
    None, with the grounding tokens of ``style`` (``model.lm.grounding_tokens``) and
    ``video_whitespace`` (:func:`add_grounding_tokens`)."""
    if name_or_path:
        if reason := tokenizer_folder_error(Path(name_or_path)):
            raise ValueError(reason)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    else:
        tokenizer = train_local_tokenizer(texts, vocab_size)
    return add_grounding_tokens(tokenizer, style, video_whitespace)


def other_vocabulary(tokenizer: PreTrainedTokenizerBase, own: PreTrainedTokenizerBase) -> str | None:
    """How ``tokenizer`` spells one of the ids of ``own`` (a model's own tokenizer) otherwise; None when
    it spells them all alike (its added tokens may follow)."""
    spelled = {index: token for token, index in tokenizer.get_vocab().items()}
    for token, index in sorted(own.get_vocab().items(), key=lambda item: item[1]):
        if spelled.get(index) != token:
            return f"token id {index} is {token!r} in the model's own tokenizer, {spelled.get(index)!r} in this one"
    return None


def model_vocabulary_error(tokenizer: PreTrainedTokenizerBase, name_or_path: str, dtype: str) -> str | None:
    """How ``tokenizer`` spells the LM's ids otherwise than the tokenizer beside the LM's weights; None
    when alike, or when the LM holds none to compare with (then ``model.lm.tokenizer`` is its only one)."""
    try:
        own = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path, dtype))
    except (OSError, ValueError):
        return None
    return other_vocabulary(tokenizer, own)


def folder_files(folder: Path) -> dict[str, bytes]:
    """The files of a saved tokenizer's ``folder``, by name."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes, by name (what a checkpoint keeps of its tokenizer)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return folder_files(Path(folder))


def token_meanings(tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, int], list[str]]:
    """What a tokenizer's ids mean, whatever version of the library wrote it: each token's id (added
    tokens too) and which tokens are special."""
    return tokenizer.get_vocab(), sorted(tokenizer.all_special_tokens)


def same_tokenizer(files: dict[str, bytes], tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer saved as ``files`` (:func:`tokenizer_files`) gives every token id the
    meaning ``tokenizer`` gives it."""
    saved = tokenizer_from_files(files, "kept")  # what ids mean does not depend on whitespace
    return token_meanings(saved) == token_meanings(tokenizer)


class TokenizerError(ValueError):
    """A run's saved tokenizer that cannot be read; the message says which."""


def saved_tokenizer(folder: Path, video_whitespace: str, what: str) -> PreTrainedTokenizerBase:
    """The tokenizer a run saved in ``folder``, ``<video>`` spelled as ``video_whitespace`` says (a saved
    tokenizer may forget it); TokenizerError, ``what`` it is, when its files do not read as one."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # truncated (JSONDecodeError) or edited: a KeyError, TypeError, or the
        # tokenizers library's plain Exception for a vocabulary that lost a token
        raise TokenizerError(f"{what} cannot be read ({' '.join(str(error).split())})") from error
    return add_grounding_tokens(tokenizer, video_whitespace=video_whitespace)


def tokenizer_from_files(files: dict[str, bytes], video_whitespace: str) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`tokenizer_files` kept, ``<video>`` spelled as ``video_whitespace`` says;
    TokenizerError when the files do not read as one (a damaged checkpoint)."""
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            (Path(folder) / name).write_bytes(content)
        return saved_tokenizer(Path(folder), video_whitespace, "the tokenizer it carries")
