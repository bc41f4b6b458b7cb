"""The vocabulary, built by the seed notebook's rule; torch-free so the runtime shares it.

Rule (seed): words with frequency > min_word_freq, ids from 1 in order of first appearance over
images[].sentences[].tokens, then <unk>, <start>, <end>; <pad> = 0.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable, Sequence

from captrt.files import open_regular

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)


class Vocab:
    """Bidirectional word <-> id map; ids are dense 0..len-1 with <pad> at 0."""

    def __init__(self, word2id: dict[str, int]):
        for special in SPECIALS:
            if special not in word2id:
                raise ValueError(f"vocabulary: missing special token {special}")
        if word2id[PAD] != 0:
            raise ValueError(f"vocabulary: {PAD} must have id 0, got {word2id[PAD]}")
        ids = sorted(word2id.values())
        if ids != list(range(len(ids))):
            raise ValueError("vocabulary: ids must be the dense range 0..N-1 with no repeats")
        self.word2id = dict(word2id)
        self.id2word = {i: w for w, i in word2id.items()}

    def __len__(self) -> int:
        return len(self.word2id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.word2id == other.word2id

    @property
    def pad(self) -> int:
        return self.word2id[PAD]

    @property
    def unk(self) -> int:
        return self.word2id[UNK]

    @property
    def start(self) -> int:
        return self.word2id[START]

    @property
    def end(self) -> int:
        return self.word2id[END]

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids with <start> ... <end>, unknown words mapped to <unk> (no padding)."""
        return [self.start] + [self.word2id.get(t, self.unk) for t in tokens] + [self.end]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of a generated sequence, without <start>, <end>, <pad> (<unk> is kept: it is output)."""
        skip = {self.start, self.end, self.pad}
        return [self.id2word[int(i)] for i in ids if int(i) not in skip]

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_word_freq: int = 5) -> "Vocab":
        freq: Counter[str] = Counter()
        for tokens in captions:
            freq.update(tokens)  # Counter keeps first-appearance order, as the seed relies on
        words = [w for w in freq if freq[w] > min_word_freq and w not in SPECIALS]
        word2id = {w: i for i, w in enumerate(words, 1)}
        word2id[UNK] = len(word2id) + 1
        word2id[START] = len(word2id) + 1
        word2id[END] = len(word2id) + 1
        word2id[PAD] = 0
        return cls(word2id)

    def to_json(self) -> dict:
        return {"word2id": self.word2id}

    @classmethod
    def from_json(cls, data: dict, source: str = "vocabulary") -> "Vocab":
        # Accept {"word2id": {...}} (captrt) and a bare word map (the tutorial's WORDMAP_*.json).
        word2id = data.get("word2id", data) if isinstance(data, dict) else None
        if not isinstance(word2id, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in word2id.items()):
            raise ValueError(f"{source}: expected a JSON object mapping words to integer ids")
        try:
            return cls(word2id)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        try:
            with open_regular(path) as f:
                data = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read vocabulary: {exc}") from None
        return cls.from_json(data, source=str(path))
