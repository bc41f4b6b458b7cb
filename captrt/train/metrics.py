"""COCO caption metrics (pycocoevalcap) plus the seed's nltk corpus BLEU-4, and the COCO results file.

Captions arrive already tokenized and lowercased (lists of words), so pycocoevalcap's PTBTokenizer
(a Java/CoreNLP subprocess) is skipped: each caption is joined with single spaces, which is exactly
what the scorers split on again.

Java: METEOR runs pycocoevalcap's meteor-1.5.jar. When `java` is not on PATH, METEOR is reported as
NaN with a RuntimeWarning and every other metric is still computed; if Java is present but the
METEOR process fails, that is a RuntimeError (a broken setup should not pass silently).
SPICE additionally needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use;
this machine has no internet, so when they are missing `spice=True` raises RuntimeError up front.
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Hashable, Mapping, Sequence

from captrt.atomic import atomic_write_text

# A METEOR JVM that produces no output line for this long is assumed hung and killed. Loading the
# paraphrase table takes ~10 s on this machine; scoring is one line per image, so any real run makes
# progress far more often than this.
METEOR_STALL_TIMEOUT_S = 300.0

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
NLTK_BLEU_KEY = "BLEU-4 (nltk corpus)"


# ----------------------------------------------------------------------------------------- validation
def _check_tokens(tokens: object, where: str, *, allow_empty: bool) -> list[str]:
    """Return `tokens` as a list of words; reject strings, non-str words and words with whitespace."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise ValueError(f"{where}: expected a list of word tokens, got {type(tokens).__name__} "
                         f"{str(tokens)[:60]!r}")
    words = list(tokens)
    if not words and not allow_empty:
        raise ValueError(f"{where}: caption has no words")
    for w in words:
        # A word with a space in it would be split again by the scorers and silently change n-gram counts.
        if not isinstance(w, str) or not w or w != "".join(w.split()):
            raise ValueError(f"{where}: bad token {w!r} (tokens must be non-empty strings without whitespace)")
    return words


def _check_refs(refs: object, where: str) -> list[list[str]]:
    if isinstance(refs, (str, bytes)) or not isinstance(refs, Sequence) or len(refs) == 0:
        raise ValueError(f"{where}: expected a non-empty list of reference captions (lists of words)")
    return [_check_tokens(r, f"{where}[{k}]", allow_empty=False) for k, r in enumerate(refs)]


def _aligned(references: Mapping[Hashable, object], hypotheses: Mapping[Hashable, object]
             ) -> tuple[list[Hashable], list[list[list[str]]], list[list[str]]]:
    """Validate both dicts and return (ids, refs, hyps) in one shared id order."""
    if not isinstance(references, Mapping) or not isinstance(hypotheses, Mapping):
        raise ValueError("references and hypotheses must both be dicts keyed by image id")
    ref_ids, hyp_ids = set(references), set(hypotheses)
    if ref_ids != hyp_ids:
        only_ref = sorted(map(repr, ref_ids - hyp_ids))[:5]
        only_hyp = sorted(map(repr, hyp_ids - ref_ids))[:5]
        raise ValueError(f"references and hypotheses have different image ids: "
                         f"{len(ref_ids - hyp_ids)} only in references (e.g. {', '.join(only_ref) or '-'}), "
                         f"{len(hyp_ids - ref_ids)} only in hypotheses (e.g. {', '.join(only_hyp) or '-'})")
    if not ref_ids:
        raise ValueError("references and hypotheses are empty: nothing to score")
    ids = list(references)
    refs = [_check_refs(references[i], f"references[{i!r}]") for i in ids]
    hyps = [_check_tokens(hypotheses[i], f"hypotheses[{i!r}]", allow_empty=True) for i in ids]
    return ids, refs, hyps


# ------------------------------------------------------------------------------------------ nltk BLEU
def corpus_bleu4(references: list[list[list[str]]], hypotheses: list[list[str]]) -> float:
    """nltk corpus BLEU-4, no smoothing: the seed's (and sgrvinod's) validation metric. No Java needed.

    references: N lists of reference captions (each a list of words); hypotheses: N word lists.
    A corpus with no 4-gram match scores ~0 (nltk's unsmoothed method0); its warning is silenced.
    """
    if isinstance(references, Mapping) or isinstance(hypotheses, Mapping):
        raise ValueError("corpus_bleu4 takes aligned lists; use caption_metrics for dicts keyed by image id")
    if len(references) != len(hypotheses):
        raise ValueError(f"corpus_bleu4: {len(references)} reference sets but {len(hypotheses)} hypotheses")
    if len(hypotheses) == 0:
        raise ValueError("corpus_bleu4: no hypotheses to score")
    refs = [_check_refs(r, f"references[{k}]") for k, r in enumerate(references)]
    hyps = [_check_tokens(h, f"hypotheses[{k}]", allow_empty=True) for k, h in enumerate(hypotheses)]
    return _nltk_bleu4(refs, hyps)


def _nltk_bleu4(refs: list[list[list[str]]], hyps: list[list[str]]) -> float:
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        # nltk warns for every zero n-gram count; the seed filters all warnings, we filter only these.
        warnings.simplefilter("ignore", UserWarning)
        return float(corpus_bleu(refs, hyps))


# ---------------------------------------------------------------------------------------------- METEOR
def _meteor_dir() -> Path:
    import pycocoevalcap.meteor.meteor as pycoco_meteor

    return Path(pycoco_meteor.__file__).resolve().parent


class _MeteorProcess:
    """One meteor-1.5.jar JVM speaking its -stdio protocol, always killed by close() / `with`.

    Written instead of pycocoevalcap's Meteor class, which pipes stderr without ever reading it (a
    chatty JVM can block), returns its lock only on success (a failed call makes __del__ deadlock),
    and reads stdout with no timeout (a dead or stuck JVM hangs the caller). Same jar, same flags
    (-l en -norm, -Xmx2G) and same SCORE/EVAL protocol, so the scores are the same.
    """

    def __init__(self, java: str, stall_timeout: float = METEOR_STALL_TIMEOUT_S):
        # stderr goes to a file: never blocks the JVM, and is quoted if something goes wrong.
        self._stderr = tempfile.TemporaryFile()
        cmd = [java, "-Xmx2G", "-Dfile.encoding=UTF-8", "-Duser.language=en", "-Duser.country=US",
               "-jar", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
        self._proc = subprocess.Popen(cmd, cwd=_meteor_dir(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr)
        self._stall_timeout = stall_timeout
        self._last_progress = time.monotonic()
        self._timed_out = False
        self._done = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="meteor-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        # Kill the JVM if it stops answering; the blocked readline then sees EOF and we raise.
        while not self._done.wait(1.0):
            if time.monotonic() - self._last_progress > self._stall_timeout:
                self._timed_out = True
                self._proc.kill()
                return

    def _fail(self, what: str) -> RuntimeError:
        self._stderr.seek(0)
        tail = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
        why = f"no output for {self._stall_timeout:.0f} s, killed" if self._timed_out else \
            f"exit code {self._exit_code()}"
        return RuntimeError(f"METEOR (java -jar {_meteor_dir() / 'meteor-1.5.jar'}) failed while {what} "
                            f"({why}){': ' + tail if tail else ''}")

    def _exit_code(self) -> int | None:
        """The JVM's exit code once it has exited. Its stdout closes a moment before the process is reaped,
        so poll() alone could still say None (seen as a flaky test): wait a little for it."""
        try:
            return self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def _ask(self, line: str, n_answers: int, what: str) -> list[str]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._last_progress = time.monotonic()  # the stall clock runs from the question, not from startup
        try:
            self._proc.stdin.write(line.encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        except OSError as e:  # BrokenPipeError: the JVM is gone
            raise self._fail(what) from e
        answers = []
        for _ in range(n_answers):
            out = self._proc.stdout.readline()
            if not out.endswith(b"\n"):
                raise self._fail(what)
            self._last_progress = time.monotonic()
            answers.append(out.decode("utf-8").strip())
        return answers

    def score(self, refs: list[list[str]], hyps: list[str]) -> tuple[float, list[float]]:
        """Corpus METEOR and per-caption scores; refs[i] are space-joined references of hyps[i]."""
        def clean(s: str) -> str:
            # '|||' is the protocol's field separator (pycocoevalcap strips it from hypotheses too).
            return " ".join(s.replace("|||", "").split())

        stats = []
        for i, (rs, h) in enumerate(zip(refs, hyps)):
            line = " ||| ".join(["SCORE", *map(clean, rs), clean(h)])
            stats.append(self._ask(line, 1, f"scoring caption {i}")[0])
        # EVAL with all segment statistics: one score per segment, then the corpus score.
        answers = self._ask(" ||| ".join(["EVAL", *stats]), len(stats) + 1, "computing the corpus score")
        try:
            values = [float(a) for a in answers]
        except ValueError as e:
            raise RuntimeError(f"METEOR returned unparseable scores: {answers[:3]}") from e
        return values[-1], values[:-1]

    def close(self) -> None:
        self._done.set()
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()  # EOF makes the JVM exit on its own
            except OSError:
                pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()
        self._watchdog.join()

    def __enter__(self) -> "_MeteorProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _find_java() -> str | None:
    return shutil.which("java")


# ----------------------------------------------------------------------------------------------- SPICE
def _spice_dir() -> Path:
    import pycocoevalcap.spice.spice as pycoco_spice

    return Path(pycoco_spice.__file__).resolve().parent


def _require_spice() -> None:
    """Raise RuntimeError unless SPICE can run offline (Java + the CoreNLP jars pycocoevalcap downloads)."""
    if _find_java() is None:
        raise RuntimeError("SPICE needs Java, and `java` is not on PATH")
    lib = _spice_dir() / "lib"
    missing = [lib / f"stanford-corenlp-3.6.0{s}.jar" for s in ("", "-models")]
    missing = [p for p in missing if not p.is_file()]
    if missing:
        raise RuntimeError(f"SPICE needs Stanford CoreNLP 3.6.0, which is not installed: missing "
                           f"{', '.join(map(str, missing))}. pycocoevalcap would download it from "
                           f"nlp.stanford.edu (stanford-corenlp-full-2015-12-09.zip), which this machine "
                           f"cannot reach; copy both jars there to enable spice=True")


# ------------------------------------------------------------------------------------------- the API
def caption_metrics(references: dict[int | str, list[list[str]]], hypotheses: dict[int | str, list[str]],
                    spice: bool = False) -> dict[str, float]:
    """COCO caption metrics of tokenized captions: one hypothesis per image id, >= 1 reference each.

    Returns 'BLEU-1'..'BLEU-4', 'METEOR', 'ROUGE-L', 'CIDEr' (pycocoevalcap; its CIDEr is CIDEr-D)
    and 'BLEU-4 (nltk corpus)' (nltk corpus_bleu, as the seed reports it), plus 'SPICE' if asked.
    METEOR is NaN (with a RuntimeWarning) when Java is missing. CIDEr's idf is computed over the
    given images, so it needs >= 2 images with different references to mean anything (1 image -> 0).
    Raises ValueError for mismatched id sets or malformed captions; empty hypotheses are allowed.
    """
    ids, refs, hyps = _aligned(references, hypotheses)
    if spice:
        _require_spice()  # fail before the slow part, not after it
    # pycocoevalcap scorers take dicts id -> list of strings; joining with spaces replaces PTBTokenizer.
    # Keys are positions, not image ids: pycocoevalcap's Spice sorts the keys, which fails on mixed int/str ids.
    gts = {k: [" ".join(r) for r in rs] for k, rs in enumerate(refs)}
    res = {k: [" ".join(h)] for k, h in enumerate(hyps)}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = _find_java()
    meteor = None
    if java is None:
        warnings.warn("METEOR needs Java and `java` is not on PATH: METEOR is reported as NaN",
                      RuntimeWarning, stacklevel=2)
    else:
        meteor = _MeteorProcess(java)  # started first: the JVM loads its tables while Python scores
    try:
        out: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({k: float(v) for k, v in zip(BLEU_KEYS, bleu)})
        out["METEOR"] = math.nan
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        out[NLTK_BLEU_KEY] = _nltk_bleu4(refs, hyps)
        if meteor is not None:
            out["METEOR"] = meteor.score([gts[k] for k in gts], [res[k][0] for k in gts])[0]
    finally:
        if meteor is not None:
            meteor.close()
    if spice:
        from pycocoevalcap.spice.spice import Spice

        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out


def _json_id(image_id: object, where: str) -> int | str:
    if isinstance(image_id, str):
        return image_id
    if isinstance(image_id, bool):
        raise ValueError(f"{where}: image id must be an int or str, got {image_id!r}")
    try:
        return operator.index(image_id)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise ValueError(f"{where}: image id must be an int or str, got {type(image_id).__name__}") from None


def write_coco_results(path: str | os.PathLike, image_ids: list, captions: list[str]) -> None:
    """Write [{"image_id": id, "caption": "..."}] (COCO results format) atomically to `path`.

    One caption per image (COCO's caption evaluation requires it), captions as plain strings.
    """
    if len(image_ids) != len(captions):
        raise ValueError(f"{path}: {len(image_ids)} image ids but {len(captions)} captions")
    rows, seen = [], set()
    for k, (image_id, caption) in enumerate(zip(image_ids, captions)):
        iid = _json_id(image_id, f"{path}: image_ids[{k}]")
        if iid in seen:
            raise ValueError(f"{path}: image id {iid!r} appears twice (COCO results hold one caption per image)")
        seen.add(iid)
        if not isinstance(caption, str):
            raise ValueError(f"{path}: captions[{k}] must be a str (join the words with spaces), "
                             f"got {type(caption).__name__}")
        rows.append({"image_id": iid, "caption": caption})
    atomic_write_text(path, json.dumps(rows, ensure_ascii=False))
