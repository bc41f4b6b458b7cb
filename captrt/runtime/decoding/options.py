"""Decoding options: one flat set of keyword arguments (CTranslate2's names), validated once.

Every entry point (Captioner.caption, `captrt caption`/`batch` flags, `captrt serve` fields) builds a
DecodingOptions and calls `check`, so a bad value gets the same message, naming the field, everywhere.
`resolve` turns the words into ids for the search (LogitRules).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np

from captrt.vocab import SPECIALS, Vocab

# Options that change the logits inside the step graph (or need its full log-probs): a model directory
# exported before format version 2 has no inputs for them.
GRAPH_OPTIONS = ("suppress", "disable_unk", "min_length", "repetition_penalty", "no_repeat_ngram_size", "prefix",
                 "sample")


SCALE_MIN, SCALE_MAX = 1e-3, 1e3  # repetition_penalty and sampling_temperature


class DecodingOptionError(ValueError):
    """A decoding option has a bad value; `field` names it (the HTTP service answers 422 with it)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}" if message.startswith("must") else f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode; the defaults are the seed's beam search (see README "Decoding controls").

    beam_size: beams (1 with sample=True). max_steps: decoder steps, prefix included.
    length_penalty: GNMT alpha when ranking finished hypotheses (0 = raw log-probability).
    num_hypotheses: hypotheses returned per image (<= beam_size; with sample=True, independent samples).
    return_scores: give each hypothesis its per-word log-probabilities (token_scores).
    suppress: words never generated. disable_unk: never generate <unk>. min_length: <end> is banned
    until a hypothesis has this many words. repetition_penalty: CTRL penalty theta on words already
    generated (1 = off). no_repeat_ngram_size: no n-gram occurs twice in a hypothesis (0 = off).
    prefix: words every caption starts with (forced, scored). sample: random sampling instead of beam
    search; sampling_topk (0 = all words), sampling_topp (nucleus, 1 = off), sampling_temperature (> 0),
    seed (int for reproducible draws, None for fresh entropy).
    """

    beam_size: int = 5
    max_steps: int = 50
    length_penalty: float = 0.0
    num_hypotheses: int = 1
    return_scores: bool = False
    suppress: tuple[str, ...] = ()
    disable_unk: bool = False
    min_length: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    prefix: tuple[str, ...] = ()
    sample: bool = False
    sampling_topk: int = 0
    sampling_topp: float = 1.0
    sampling_temperature: float = 1.0
    seed: int | None = None

    @classmethod
    def build(cls, **values: Any) -> "DecodingOptions":
        """From keyword arguments (None means the default); word lists may be any sequence of strings
        or one space-separated string. Raises DecodingOptionError for unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DecodingOptionError(unknown[0], f"unknown decoding option(s) {unknown}; known: {sorted(known)}")
        clean = {k: v for k, v in values.items() if v is not None or k == "seed"}
        for name in ("suppress", "prefix"):
            if name in clean:
                clean[name] = _words(name, clean[name])
        return cls(**clean)

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults (for logs, bench rows and error messages)."""
        default = DecodingOptions()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}

    @property
    def needs_graph_controls(self) -> bool:
        """True when the step graph must process logits or return full log-probs (format version 2)."""
        return any(k in GRAPH_OPTIONS for k in self.changed())

    def check(self, vocab: Vocab, *, max_beam: int, max_steps: int | None = None) -> "DecodingOptions":
        """Validate every field against the model; returns self. max_steps: the caller's cap, if any."""
        _integer("beam_size", self.beam_size, 1, max_beam, f" (the model's max_beam is {max_beam})")
        _integer("max_steps", self.max_steps, 1, max_steps, " (the service's cap)" if max_steps else "")
        _number("length_penalty", self.length_penalty, low=0.0)
        _boolean("return_scores", self.return_scores)
        _boolean("disable_unk", self.disable_unk)
        _boolean("sample", self.sample)
        if self.sample:
            if self.beam_size != 1:
                raise DecodingOptionError("beam_size", f"sampling decodes one word at a time: beam_size must be 1 "
                                                       f"with sample=True, got {self.beam_size}")
            _integer("num_hypotheses", self.num_hypotheses, 1, max_beam,
                     f" (independent samples; the model's max_beam is {max_beam})")
        else:
            _integer("num_hypotheses", self.num_hypotheses, 1, self.beam_size, " (at most beam_size)")
        _integer("min_length", self.min_length, 0, self.max_steps - 1,
                 f" (below max_steps={self.max_steps}, so that <end> can still be generated)")
        # Bounded, not only > 0: theta and T divide logits, and a tiny one (say 5e-324, 0 in float32) makes
        # them infinite, which no search can rank.
        _number("repetition_penalty", self.repetition_penalty, low=SCALE_MIN, high=SCALE_MAX)
        _integer("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, None)
        _integer("sampling_topk", self.sampling_topk, 0, None)
        _number("sampling_topp", self.sampling_topp, low=0.0, strict=True, high=1.0)
        _number("sampling_temperature", self.sampling_temperature, low=SCALE_MIN, high=SCALE_MAX)
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2**63 - 1)
        for name in ("suppress", "prefix"):
            for word in getattr(self, name):
                if word in SPECIALS:
                    raise DecodingOptionError(name, f"{word!r} is a special token; use disable_unk for <unk> "
                                                    "and min_length for <end>")
                if word not in vocab.word2id:
                    raise DecodingOptionError(name, f"{word!r} is not in the model's vocabulary")
        if len(self.prefix) >= self.max_steps:
            raise DecodingOptionError("prefix", f"{len(self.prefix)} words leave no step of max_steps="
                                                f"{self.max_steps} to decode")
        n = self.no_repeat_ngram_size
        if n and _repeats_ngram(list(self.prefix), n):
            raise DecodingOptionError("prefix", f"repeats an n-gram of no_repeat_ngram_size={n} itself")
        clash = sorted(set(self.prefix) & set(self.suppress))
        if clash:
            raise DecodingOptionError("prefix", f"forces suppressed word(s) {clash}")
        return self

    def resolve(self, vocab: Vocab) -> "LogitRules":
        """Word lists -> ids (call check first)."""
        banned = sorted({vocab.word2id[w] for w in self.suppress} | ({vocab.unk} if self.disable_unk else set()))
        return LogitRules(vocab_size=len(vocab), end=vocab.end, banned=np.asarray(banned, dtype=np.int64),
                          min_length=self.min_length, repetition_penalty=float(self.repetition_penalty),
                          no_repeat_ngram_size=self.no_repeat_ngram_size,
                          prefix=[vocab.word2id[w] for w in self.prefix])


@dataclass(frozen=True)
class LogitRules:
    """The logit processing of one search, in word ids (see captrt.runtime.decoding.processing)."""

    vocab_size: int
    end: int
    banned: np.ndarray  # (B0,) int64: suppress + <unk>
    min_length: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    prefix: Sequence[int] = ()

    @property
    def active(self) -> bool:
        return bool(self.banned.size or self.min_length or self.repetition_penalty != 1.0
                    or self.no_repeat_ngram_size)


def _words(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    try:
        words = tuple(value)
    except TypeError:
        raise DecodingOptionError(name, f"expected a list of words, got {value!r}") from None
    for w in words:
        if not isinstance(w, str) or not w or w != w.strip() or " " in w:
            raise DecodingOptionError(name, f"expected single words, got {w!r}")
    return words


def _integer(name: str, value: Any, low: int, high: int | None, hint: str = "") -> None:
    wrong = isinstance(value, bool) or not isinstance(value, (int, np.integer))
    if wrong or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise DecodingOptionError(name, f"must be an integer {bound}{hint}, got {value!r}")


def _number(name: str, value: Any, *, low: float, strict: bool = False, high: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer)) \
        and math.isfinite(value) and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise DecodingOptionError(name, f"must be a finite number {bound}, got {value!r}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise DecodingOptionError(name, f"must be true or false, got {value!r}")


def _repeats_ngram(words: list, n: int) -> bool:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))
