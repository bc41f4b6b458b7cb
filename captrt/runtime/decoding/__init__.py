"""Decoding: options and their validation, logit processing, beam search, sampling, hypotheses.

Torch-free (numpy over an Engine). The oracle for every option is captrt.train.reference.
"""

from captrt.runtime.decoding.beam import beam_search
from captrt.runtime.decoding.hypotheses import BeamResult, Hypothesis, length_penalty_factor
from captrt.runtime.decoding.options import DecodingOptionError, DecodingOptions, LogitRules
from captrt.runtime.decoding.sampling import sample_search

__all__ = ["BeamResult", "DecodingOptionError", "DecodingOptions", "Hypothesis", "LogitRules", "beam_search",
           "length_penalty_factor", "sample_search"]
