"""The library function behind `captrt caption`: files in, one caption per line (or JSON lines) out.

    caption_files(["photos/", "*.jpg", "x.png"], "model_dir", json_lines=True)

Directories and glob patterns expand to image files (common extensions, sorted); images go to the
Captioner in batches; progress goes to stderr (a bar on a terminal, periodic lines otherwise); unreadable images are
reported (stderr, or the JSON line's "error") without stopping the others.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from captrt.checks import check_int
from captrt.progress import Progress
from captrt.runtime.errors import EngineUnavailableError, ModelDirError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
_GLOB_CHARS = set("*?[")


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """-> (image paths in order, problems). A directory gives its image files (not recursive);
    a pattern gives its matching image files (`**` recurses); a plain path is kept as given."""
    files: list[str] = []
    problems: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{item}: directory holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif _GLOB_CHARS & set(item) and not os.path.exists(item):
            found = sorted(p for p in glob.glob(item, recursive=True)
                           if os.path.isfile(p) and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{item}: pattern matches no images")
            files.extend(found)
        else:
            files.append(item)  # a missing or unreadable file is reported per image, with its error
    return files, problems


def _attention_name(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "image"
    name, i = f"{stem}.png", 1
    while name in used:  # same file name from two directories: keep both
        name, i = f"{stem}-{i}.png", i + 1
    used.add(name)
    return name


def _header_line(captioner: Any) -> str:
    """With --precision auto, --json's first line says what runs and why: {"header": {"model", "engine",
    "provider", "precision", "verification", "precision_choice"}} (no "image" key: it is not a caption)."""
    info = captioner.info()
    keys = ("id", "engine", "provider", "precision", "verification", "precision_choice")
    return json.dumps({"header": {("model" if k == "id" else k): info[k] for k in keys}}, ensure_ascii=False,
                      default=str)


def _json_line(path: str, cap: Any, hypotheses: bool = False) -> str:
    return json.dumps({"image": path, **cap.to_dict(hypotheses=hypotheses)}, ensure_ascii=False)


def caption_files(inputs: Sequence[str], model_dir: str | os.PathLike, engine: str = "ort", device: str | None = None,
                  precision: str = "fp32", beam: int = 5, batch: int = 16, json_lines: bool = False,
                  attention_dir: str | os.PathLike | None = None, max_steps: int = 50, out: TextIO | None = None,
                  *, threads: int | None = None, providers: str | None = None, length_penalty: float = 0.0,
                  progress: bool | None = None, err: TextIO | None = None, allow_unverified: bool = False,
                  decoding: dict[str, Any] | None = None) -> int:
    """Caption image files; returns the exit code: 0 all captioned, 1 some images failed, 2 bad usage
    (no images, bad model directory, unavailable engine, bad option).

    Prints `path<TAB>caption` per image to `out` (errors to `err`), or with json_lines one
    {"image", "caption", "tokens", "score", "finished", "error"} object per image (errors included),
    after a {"header": ...} line when precision is "auto" (what it chose and why). Without json_lines,
    "auto" says its choice on `err`.
    attention_dir: write one seed-style attention PNG per captioned image there (needs matplotlib).
    device None: 'cuda' for engine='trt', else 'cpu'. progress None: a bar when `err` is a terminal, else a
    plain line every 30 s; True forces the bar, False shows nothing. decoding: the decoding controls
    (Captioner.caption's keyword arguments); with num_hypotheses > 1 or return_scores, --json lines
    carry "hypotheses" (and "token_scores"), and the plain output shows the first caption.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err

    def complain(message: str) -> None:
        err.write(f"captrt: {message}\n")
        err.flush()

    files, problems = expand_inputs(list(inputs))
    for p in problems:
        complain(p)
    if not files:
        complain("no images to caption")
        return EXIT_USAGE
    from captrt.runtime.captioner import Captioner

    try:
        check_int("batch", batch)
        captioner = Captioner.load(model_dir, engine=engine, device=device, precision=precision,
                                   threads=threads, providers=providers, allow_unverified=allow_unverified)
    except (ModelDirError, EngineUnavailableError, ValueError) as exc:
        complain(str(exc))
        return EXIT_USAGE
    # The flags' beam, max_steps and length_penalty, then the rest of the options given (which may repeat them).
    decoding = {"beam_size": beam, "max_steps": max_steps, "length_penalty": length_penalty, **(decoding or {})}
    hypotheses = decoding.get("num_hypotheses", 1) > 1 or bool(decoding.get("return_scores"))
    if captioner.precision_choice is not None:
        if json_lines:
            out.write(_header_line(captioner) + "\n")
        else:
            complain(f"precision auto: {captioner.precision_choice.chosen} ({captioner.precision_choice.reason})")
    failed = len(problems)
    plot_dir = Path(attention_dir) if attention_dir is not None else None
    used_names: set[str] = set()
    # A bar on a terminal, a plain line every 30 s in logs (captrt.progress); progress=False: nothing.
    bar = Progress(len(files), label="captrt caption", stream=err, tty=progress, enabled=progress is not False)
    try:
        for s in range(0, len(files), batch):
            chunk = files[s:s + batch]
            # With plots, each image is decoded once here and both captioned and drawn from the array;
            # an unreadable one stays a path, so caption() reports it exactly as without plots.
            images = [_read_or_path(captioner, p) for p in chunk] if plot_dir is not None else chunk
            try:
                caps = captioner.caption(images, return_attention=plot_dir is not None, batch_size=batch, **decoding)
            except ValueError as exc:  # a bad beam/max_steps/decoding option: same for every batch
                bar.close()
                complain(str(exc))
                return EXIT_USAGE
            for path, image, cap in zip(chunk, images, caps):
                if cap.error is not None:
                    failed += 1
                    if not json_lines:
                        complain(cap.error)
                if json_lines:
                    out.write(_json_line(path, cap, hypotheses) + "\n")
                elif cap.error is None:
                    out.write(f"{path}\t{cap.text}\n")
                if plot_dir is not None and cap.error is None:
                    failed += _plot(captioner, path, image, cap, plot_dir / _attention_name(path, used_names), complain)
            out.flush()
            bar.update(len(chunk))
    finally:
        bar.close()
        captioner.close()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _read_or_path(captioner: Any, path: str) -> Any:
    from captrt.runtime.preprocess import InvalidImageError

    try:
        return captioner.read_image(path)
    except InvalidImageError:
        return path


def _plot(captioner: Any, path: str, image: Any, cap: Any, target: Path, complain) -> int:
    """Draw `cap`'s attention over `image`, the (S, S, 3) array it was captioned from."""
    from captrt.attention_plot import plot_attention

    try:
        words = [captioner.vocab.id2word[t] for t in cap.tokens]
        plot_attention(image, words, cap.attention, target)
    except (OSError, RuntimeError) as exc:  # e.g. an unwritable directory, or no matplotlib
        complain(f"{path}: attention plot not written: {exc}")
        return 1
    return 0
