"""Byte-level instruction tokenizer that ships with the repository (no vocabulary download).

Text is lower-cased, stripped and encoded as UTF-8; token id = byte + 2, id 1 is a BOS token
always present at position 0, id 0 is padding. Sequences are truncated to ``max_len``.
"""
from __future__ import annotations

import torch

PAD_ID = 0
BOS_ID = 1
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET


class ByteTokenizer:
    vocab_size = VOCAB_SIZE
    pad_id = PAD_ID

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len

    def encode(self, text: str) -> list[int]:
        ids = [BOS_ID] + [b + BYTE_OFFSET for b in text.strip().lower().encode("utf-8")]
        return ids[: self.max_len]

    def decode(self, ids) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids if int(i) >= BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_len), PAD_ID, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def make_tokenizer(vocab: str, max_len: int) -> ByteTokenizer:
    if vocab != "byte":
        raise ValueError(f"unknown tokenizer vocabulary {vocab!r} (available: 'byte')")
    return ByteTokenizer(max_len)
