"""Marker-delimited sections of benchmarks/RESULTS.md that another script owns.

`benchmarks/serve.py` writes its results between ``<!-- serve:begin -->`` and ``<!-- serve:end -->``,
`benchmarks/batch.py` between ``<!-- batch:begin -->`` and ``<!-- batch:end -->``,
`benchmarks/precisions.py` between ``<!-- precisions:begin -->`` and ``<!-- precisions:end -->``,
`benchmarks/decoding.py` between ``<!-- decoding:begin -->`` and ``<!-- decoding:end -->``,
`benchmarks/streams.py` between ``<!-- streams:begin -->`` and ``<!-- streams:end -->``,
`benchmarks/ray_serve.py` between ``<!-- rayserve:begin -->`` and ``<!-- rayserve:end -->``,
`benchmarks/protocols.py` between ``<!-- protocols:begin -->`` and ``<!-- protocols:end -->``,
`benchmarks/precision_auto.py` between ``<!-- auto:begin -->`` and ``<!-- auto:end -->``;
`benchmarks/run_suite.py` rewrites the rest of the file and carries such sections over verbatim.
"""

from __future__ import annotations

from pathlib import Path

SERVE_BEGIN = "<!-- serve:begin -->"
SERVE_END = "<!-- serve:end -->"
BATCH_BEGIN = "<!-- batch:begin -->"  # benchmarks/batch.py's section (corpus captioning)
BATCH_END = "<!-- batch:end -->"
OPENVINO_BEGIN = "<!-- openvino:begin -->"  # the OpenVINO engine's section (measured by hand: its CPU features vary)
OPENVINO_END = "<!-- openvino:end -->"
PRECISIONS_BEGIN = "<!-- precisions:begin -->"  # benchmarks/precisions.py: speed beside quality per precision
PRECISIONS_END = "<!-- precisions:end -->"
DECODING_BEGIN = "<!-- decoding:begin -->"  # benchmarks/decoding.py: the decoding controls' cost
DECODING_END = "<!-- decoding:end -->"
STREAMS_BEGIN = "<!-- streams:begin -->"  # benchmarks/streams.py: S x T, memory, service and corpus
STREAMS_END = "<!-- streams:end -->"
RAYSERVE_BEGIN = "<!-- rayserve:begin -->"  # benchmarks/ray_serve.py: `captrt serve` vs `captrt serve --ray`
RAYSERVE_END = "<!-- rayserve:end -->"
PROTOCOLS_BEGIN = "<!-- protocols:begin -->"  # benchmarks/protocols.py: /v1 vs the Open Inference Protocol's /v2
PROTOCOLS_END = "<!-- protocols:end -->"
AUTO_BEGIN = "<!-- auto:begin -->"  # benchmarks/precision_auto.py: auto, the int8 step alone, the plain step graph
AUTO_END = "<!-- auto:end -->"
# Every section run_suite.py carries over, in the order it appends them.
PRESERVED = ((SERVE_BEGIN, SERVE_END), (BATCH_BEGIN, BATCH_END), (OPENVINO_BEGIN, OPENVINO_END),
             (PRECISIONS_BEGIN, PRECISIONS_END), (DECODING_BEGIN, DECODING_END), (STREAMS_BEGIN, STREAMS_END),
             (RAYSERVE_BEGIN, RAYSERVE_END), (PROTOCOLS_BEGIN, PROTOCOLS_END), (AUTO_BEGIN, AUTO_END))


def find_section(text: str, begin: str = SERVE_BEGIN, end: str = SERVE_END) -> tuple[int, int] | None:
    """(start, stop) offsets of the section, markers included, or None when it is absent or malformed
    (no begin marker, or no end marker after it)."""
    start = text.find(begin)
    if start < 0:
        return None
    stop = text.find(end, start + len(begin))
    if stop < 0:
        return None
    return start, stop + len(end)


def extract_section(text: str, begin: str = SERVE_BEGIN, end: str = SERVE_END) -> str | None:
    """The section, markers included, exactly as it appears in text; None when there is none."""
    span = find_section(text, begin, end)
    return None if span is None else text[span[0]:span[1]]


def replace_section(text: str, section: str, begin: str = SERVE_BEGIN, end: str = SERVE_END) -> str:
    """text with its section replaced by `section` (which must carry the markers), or with `section`
    appended at the end after one blank line when text has none."""
    if not (section.startswith(begin) and section.rstrip().endswith(end)):
        raise ValueError(f"section must start with {begin!r} and end with {end!r}")
    section = section.rstrip()
    span = find_section(text, begin, end)
    if span is not None:
        return text[:span[0]] + section + text[span[1]:]
    head = text.rstrip()
    return (head + "\n\n" if head else "") + section + "\n"


def append_preserved(new_text: str, old_text: str | None, begin: str = SERVE_BEGIN, end: str = SERVE_END) -> str:
    """new_text with old_text's section (if any) re-appended verbatim at the end; a section already
    in new_text wins."""
    if old_text is None or find_section(new_text, begin, end) is not None:
        return new_text
    kept = extract_section(old_text, begin, end)
    if kept is None:
        return new_text
    return new_text.rstrip() + "\n\n" + kept + "\n"


def write_section(path: str | Path, section: str, begin: str = SERVE_BEGIN, end: str = SERVE_END) -> None:
    """Replace the section of the Markdown file at path (or append it; a missing file is created), atomically:
    RESULTS.md holds every script's numbers, so a run killed mid-write must not lose the others'."""
    from captrt.atomic import atomic_write_text

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    atomic_write_text(path, replace_section(text, section, begin, end))
