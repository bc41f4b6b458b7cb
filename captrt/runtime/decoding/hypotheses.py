"""What a search returns per image: ranked hypotheses, the first being the caption."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def length_penalty_factor(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha; 1 when alpha == 0 (the raw score)."""
    return ((5.0 + length) / 6.0) ** alpha if alpha else 1.0


@dataclass
class Hypothesis:
    """One decoded sequence.

    tokens: word ids without <start>/<end>. score: cumulative processed log-probability, float32
    adds in order (incl. <end> when finished). finished: False when max_steps ended it before <end>.
    token_scores: each word's processed log-prob, then <end>'s when finished (when asked), so that
    adding them in order in float32 gives `score` exactly.
    """

    tokens: list[int]
    score: float
    finished: bool
    token_scores: list[float] | None = None


@dataclass
class BeamResult:
    tokens: list[int]  # generated word ids without <start>/<end>
    score: float  # cumulative log-probability (incl. <end> when finished), as float32 -> float
    finished: bool  # False when max_steps ended the search before any hypothesis emitted <end>
    alphas: np.ndarray | None  # (T, P) float32 attention of each token in `tokens`, if asked
    hypotheses: list[Hypothesis] = field(default_factory=list)  # ranked; [0] is (tokens, score, finished)

    @classmethod
    def of(cls, hypotheses: list[Hypothesis], alphas: np.ndarray | None) -> "BeamResult":
        best = hypotheses[0]
        return cls(best.tokens, best.score, best.finished, alphas, hypotheses)
