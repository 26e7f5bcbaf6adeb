"""Build the synthetic benchmark's word-level tokenizer and load any ``tokenizer.json``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS


def _cls_sep_template(cls_id: int, sep_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )


def build_word_tokenizer(words: Iterable[str]) -> Tokenizer:
    """Word-level tokenizer whose vocabulary is ``SPECIAL_TOKENS`` (ids 0..4) then ``words``."""
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    # Split the given words exactly as text will be split at encode time, so a
    # multi-word entry like "top left" still yields in-vocabulary pieces.
    pieces = {
        piece
        for word in words
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(word))
    }
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for piece in sorted(pieces - vocab.keys()):
        vocab[piece] = len(vocab)

    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = _cls_sep_template(vocab[CLS], vocab[SEP])
    # Registering them as special keeps "[CLS]" in raw text from being lowercased/split
    # and lets decode(skip_special_tokens=True) drop them; ids stay 0..4.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.enable_padding(pad_id=vocab[PAD], pad_token=PAD)
    return tokenizer


class TextEncoder:
    """Batch-encodes text with a local ``tokenizer.json`` (ours or a BERT WordPiece one)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {path} (expected a local tokenizer.json, "
                "e.g. written by build_dataset or copied from a BERT checkpoint)"
            )
        self.path = path
        self.tokenizer = Tokenizer.from_file(str(path))
        ids = {token: self.tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path}: tokenizer lacks special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            ids[token] for token in SPECIAL_TOKENS
        )
        self.special_ids: frozenset[int] = frozenset(ids.values())
        self.vocab_size: int = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.tokenizer.post_processor is None:
            # Downstream code assumes position 0 is [CLS]; bare tokenizers would break that.
            self.tokenizer.post_processor = _cls_sep_template(self.cls_id, self.sep_id)
        self._max_len: int | None = None

    def _set_length(self, max_len: int) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        if max_len != self._max_len:
            # Truncation budgets for the post-processor's specials, so [SEP] stays last.
            self.tokenizer.enable_truncation(max_length=max_len)
            # Pad to the longest text of the batch, not to max_len: short
            # captions and questions then cost no compute for padding.
            self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD)
            self._max_len = max_len

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return token ids ``[B, L]`` (long) and a mask ``[B, L]`` (True = real
        token), L = the longest text of the batch, at most ``max_len``."""
        self._set_length(max_len)
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
        length = len(encodings[0].ids) if encodings else 0
        return ids.reshape(len(encodings), length), mask.reshape(len(encodings), length)

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` without special tokens (for logging)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
