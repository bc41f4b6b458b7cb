"""Take docs/serve-ui.png, the README's picture of `captrt serve`'s page, with a trained model.

    make demo                                    # trains and exports demo_out/model
    .venv/bin/python docs/serve_ui_screenshot.py [--model demo_out/model] [--data demo_out/synth/dataset_synth.json]

A real `captrt serve` on a free loopback port serves the model; Debian's Chromium (headless, driven by
Playwright, as in tests/serve/test_ui.py) opens the page, captions two scenes of the dataset's test
split (images the model never trained on) at the page's default beam size, and focuses one word of
the first caption (--word, counted from 0), so its attention map lies over the image. The captions are printed, and a
caption holding <unk> (an untrained model's output) is refused: the picture must show the model working.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from captrt.bench.browser import CHROMIUM, launch_chromium
from captrt.bench.serve_process import ServeProcess, ServeProcessError

ROOT = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1000, "height": 760}  # the browser tests' desktop size


def split_images(data: Path, pick: list[int]) -> list[Path]:
    """Images `pick` of the Karpathy JSON's test split (ValueError naming the file when it has too few)."""
    from captrt.train.data import load_karpathy, select_split

    entries = select_split(load_karpathy(data), "test")
    if max(pick) >= len(entries):
        raise ValueError(f"{data}: its test split has {len(entries)} images; --pick {max(pick)} is beyond it")
    return [entries[i].path for i in pick]


def shoot(model: Path, images: list[Path], word_index: int, out: Path, log: Path) -> list[str]:
    """Serve `model`, caption `images` on its page, write the full-page screenshot to `out`; the captions."""
    from playwright.sync_api import expect, sync_playwright

    server = ServeProcess(model, "--log-level", "warning", log=log, name="screenshot")
    try:
        server.wait_ready()
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_context(viewport=VIEWPORT).new_page()
                page.set_default_timeout(120_000)  # a busy 2-core machine
                page.goto(server.url + "/")
                expect(page.get_by_test_id("model")).to_contain_text("fp32")
                page.get_by_test_id("file").set_input_files([str(p) for p in images])
                captions = page.get_by_test_id("caption")
                for i in range(len(images)):
                    expect(captions.nth(i).get_by_test_id("word").first).to_be_visible()
                texts = [captions.nth(i).inner_text().strip() for i in range(len(images))]
                if any("<unk>" in t or not t for t in texts):
                    raise SystemExit(f"screenshot: the model's captions are {texts}: train it first (make demo)")
                words = captions.nth(0).get_by_test_id("word")
                if word_index >= words.count():
                    raise SystemExit(f"screenshot: --word {word_index}: the first caption, {texts[0]!r}, is shorter")
                word = words.nth(word_index)
                word.hover()
                word.focus()
                expect(word).to_have_attribute("aria-pressed", "true")
                page.wait_for_timeout(500)  # the attention map fades in
                page.screenshot(path=str(out), full_page=True)
            finally:
                browser.close()
    finally:
        server.stop()
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "demo_out" / "model", help="a `captrt export` model directory")
    ap.add_argument("--data", type=Path, default=ROOT / "demo_out" / "synth" / "dataset_synth.json",
                    help="a Karpathy JSON whose test split holds the images to caption")
    ap.add_argument("--pick", default="10,34", help="which test images (positions in the split), comma-separated; "
                    "the README's picture: 10,34 of a make demo run, two scenes its model captions correctly")
    ap.add_argument("--word", type=int, default=3, help="which word of the first caption has the focus (from 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "serve-ui.png")
    args = ap.parse_args(argv)
    if not (args.model / "captrt.json").is_file():
        print(f"screenshot: no model at {args.model}: run `make demo` first or pass --model", file=sys.stderr)
        return 2
    if not CHROMIUM.exists():
        print(f"screenshot: {CHROMIUM} is missing (apt-get install chromium; `make install` does it as root)",
              file=sys.stderr)
        return 2
    try:
        pick = [int(x) for x in args.pick.split(",")]
        if not pick or min(pick) < 0:
            raise ValueError
    except ValueError:
        print(f"screenshot: --pick: expected non-negative integers, got {args.pick!r}", file=sys.stderr)
        return 2
    try:
        images = split_images(args.data, pick)
    except (OSError, ValueError) as exc:  # DatasetError is a ValueError naming the file
        print(f"screenshot: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="captrt-screenshot.") as tmp:
        try:
            captions = shoot(args.model, images, args.word, args.out, Path(tmp) / "server.log")
        except ServeProcessError as exc:
            print(f"screenshot: {exc}", file=sys.stderr)
            return 1
    for path, text in zip(images, captions):
        print(f"{path.name}\t{text}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
