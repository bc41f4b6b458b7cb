"""Decoding options: one flat set of keyword arguments (CTranslate2's names), one table, one validation.

`DecodingOptions` is the single source of truth for the options: each field's type, default, bounds,
one-line help, whether it needs the format-2 step graph and whether it splits service batches live in
its `option(...)` metadata (`OptionSpec`). Every entry point derives from it: Captioner.caption, the
`captrt caption`/`batch` flags (captrt.cli.flags), the service's query/form parsing and its OpenAPI
schema (captrt.serve.upload), and the option table in docs/decoding.md (`options_markdown`). Text from a
command line or a request goes through `parse_option_text` (one strict parser: ASCII digits only), then
`check`, so a bad value gets the same message, naming the field, everywhere.
`resolve` turns the words into ids for the search (LogitRules).
"""

from __future__ import annotations

import math
import re
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from captrt.vocab import SPECIALS, Vocab

SCALE_MIN, SCALE_MAX = 1e-3, 1e3  # repetition_penalty and sampling_temperature
SEED_MAX = 2**63 - 1


class DecodingOptionError(ValueError):
    """A decoding option has a bad value; `field` names it (the HTTP service answers 422 with it)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}" if message.startswith("must") else f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class OptionSpec:
    """What an entry point needs to know about one decoding option.

    kind: 'int' | 'float' | 'bool' | 'words' (a list of single words; text spells it space-separated).
    low/high: the static bounds (low exclusive when `above`); `limit` names a bound only the model or the
    caller knows ('max_beam', 'max_steps_cap', 'beam_size', 'max_steps'), applied by `check`.
    graph: the step graph must process logits for it (model format 2). splits_batch: the service never
    puts requests with different values in one search (return_scores only decides what is shown).
    nullable: None is a value (seed: fresh entropy). flags: the command line's spellings.
    """

    kind: str
    help: str
    low: float | None = None
    high: float | None = None
    above: bool = False
    limit: str | None = None
    graph: bool = False
    splits_batch: bool = True
    nullable: bool = False
    flags: tuple[str, ...] = ()


def option(default: Any, kind: str, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": OptionSpec(kind, help, **spec)})


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode; the defaults are the seed's beam search (docs/decoding.md has the semantics)."""

    beam_size: int = option(5, "int", "beams per image (1 with sample)", low=1, limit="max_beam", flags=("--beam", "--beam-size"))
    max_steps: int = option(50, "int", "decoder steps per caption, prefix included", low=1, limit="max_steps_cap")
    length_penalty: float = option(0.0, "float", "GNMT alpha when ranking finished hypotheses; 0 = the seed's raw "
                                   "log-probability",
                                   low=0.0)
    num_hypotheses: int = option(1, "int", "hypotheses returned per image (with sample: independent samples)", low=1, limit="beam_size")
    return_scores: bool = option(False, "bool", "every hypothesis carries token_scores, its per-word log-probabilities",
                                 splits_batch=False)
    suppress: tuple[str, ...] = option((), "words", "words never generated (vocabulary words, no special tokens)", graph=True)
    disable_unk: bool = option(False, "bool", "<unk> is never generated", graph=True)
    min_length: int = option(0, "int", "<end> is banned until a hypothesis has this many words", low=0,
                             limit="max_steps", graph=True)
    repetition_penalty: float = option(1.0, "float", "CTRL penalty theta on words already generated; 1 = off",
                                       low=SCALE_MIN, high=SCALE_MAX, graph=True)
    no_repeat_ngram_size: int = option(0, "int", "no n-gram of this size occurs twice in a hypothesis; 0 = off", low=0, graph=True)
    prefix: tuple[str, ...] = option((), "words", "words every caption starts with: forced, scored, part of the caption", graph=True)
    sample: bool = option(False, "bool", "random sampling instead of beam search (needs beam_size 1)", graph=True)
    sampling_topk: int = option(0, "int", "draw among the k most probable words; 0 = all", low=0)
    sampling_topp: float = option(1.0, "float", "nucleus: the shortest head of the distribution reaching p; 1 = off", low=0.0, above=True, high=1.0)
    sampling_temperature: float = option(1.0, "float", "T: draw from softmax(logits / T)", low=SCALE_MIN, high=SCALE_MAX)
    seed: int | None = option(None, "int", "reproducible draws (per image: never depends on the batch); none = fresh "
                              "entropy",
                              low=0, high=SEED_MAX, nullable=True)

    @classmethod
    def build(cls, **values: Any) -> "DecodingOptions":
        """From keyword arguments (None means the default); word lists may be any sequence of strings
        or one space-separated string. Raises DecodingOptionError for unknown names."""
        known = option_names()
        unknown = sorted(set(values) - set(known))
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
        return any(SPECS[k].graph for k in self.changed())

    def check(self, vocab: Vocab | None, *, max_beam: int, max_steps: int | None = None) -> "DecodingOptions":
        """Validate every field against the model; returns self. max_steps: the caller's cap, if any.
        vocab None checks everything but the words' membership in the vocabulary."""
        if self.sample is True and self.beam_size != 1:
            raise DecodingOptionError("beam_size", f"sampling decodes one word at a time: beam_size must be 1 "
                                                   f"with sample=True, got {self.beam_size}")
        limits = {  # the bounds only the model, the caller or another field know: (high, hint)
            "max_beam": (max_beam, f" (the model's max_beam is {max_beam})"),
            "max_steps_cap": (max_steps, " (the service's cap)" if max_steps else ""),
            "beam_size": (max_beam, f" (independent samples; the model's max_beam is {max_beam})") if self.sample
            is True else (self.beam_size, " (at most beam_size)"),
            "max_steps": (self.max_steps - 1, f" (below max_steps={self.max_steps}, so that <end> can still be "
                                              "generated)"),
        }
        for f in fields(self):
            spec, value = f.metadata["spec"], getattr(self, f.name)
            high, hint = limits[spec.limit] if spec.limit else (spec.high, "")
            if spec.nullable and value is None:
                continue
            if spec.kind == "int":
                _integer(f.name, value, int(spec.low), high if high is None else int(high), hint)
            elif spec.kind == "float":
                _number(f.name, value, low=spec.low, strict=spec.above, high=high)
            elif spec.kind == "bool":
                _boolean(f.name, value)
        for name in ("suppress", "prefix"):
            for word in getattr(self, name):
                if word in SPECIALS:
                    raise DecodingOptionError(name, f"{word!r} is a special token; use disable_unk for <unk> "
                                                    "and min_length for <end>")
                if vocab is not None and word not in vocab.word2id:
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


def option_fields() -> tuple[Field, ...]:
    """DecodingOptions' fields in order; each carries its OptionSpec as metadata['spec']."""
    return fields(DecodingOptions)


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in option_fields())


SPECS: dict[str, OptionSpec] = {f.name: f.metadata["spec"] for f in option_fields()}
# Options that change the logits inside the step graph (or need its full log-probs): a model directory
# exported before format version 2 has no inputs for them.
GRAPH_OPTIONS = tuple(name for name, spec in SPECS.items() if spec.graph)

# One strict grammar for option text (query strings, form fields, command-line flags): ASCII only, so
# that '²', '٣' or '1_0' (which str.isdigit() or int() would accept) are refused, and short, so that a
# 5,000-digit integer is refused before any arithmetic.
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,19}")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,3})?")
_BOOL_TEXT = {"true": True, "false": False}
_SHOWN = 40  # characters of a bad value echoed back


def parse_option_text(name: str, text: str) -> Any:
    """One option's text form -> its value (words stay one space-separated string for `build`).
    DecodingOptionError naming the option for text that is not of its kind; bounds are `check`'s."""
    spec = SPECS.get(name)
    if spec is None:
        raise DecodingOptionError(name, f"unknown decoding option; known: {sorted(SPECS)}")
    value = text.strip()
    if spec.kind == "int":
        if _INT_TEXT.fullmatch(value):
            return int(value)
        raise DecodingOptionError(name, f"must be an integer (ASCII digits, at most 19), got {_shown(value)}")
    if spec.kind == "float":
        if _FLOAT_TEXT.fullmatch(value):
            return float(value)
        raise DecodingOptionError(name, f"must be a decimal number (ASCII digits, point, exponent), got "
                                        f"{_shown(value)}")
    if spec.kind == "bool":
        if value.lower() in _BOOL_TEXT:
            return _BOOL_TEXT[value.lower()]
        raise DecodingOptionError(name, f"must be true or false, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A bad value as an error message shows it: bounded, and never a 5,000-digit repr."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value).bit_length() > 64:
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text)} characters)"


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
        raise DecodingOptionError(name, f"must be an integer {bound}{hint}, got {_shown(value)}")


def _number(name: str, value: Any, *, low: float, strict: bool = False, high: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer)) \
        and math.isfinite(value) and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise DecodingOptionError(name, f"must be a finite number {bound}, got {_shown(value)}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise DecodingOptionError(name, f"must be true or false, got {_shown(value)}")


def _repeats_ngram(words: list, n: int) -> bool:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))
