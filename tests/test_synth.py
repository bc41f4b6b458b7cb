"""The synthetic dataset: determinism, Karpathy format, image files, caption truth measured from pixels."""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captrt.synth import make_synth_dataset, split_counts
from captrt.vocab import Vocab

# Reference colours chosen independently of captrt.synth (CSS-like names), so a wrong palette fails.
NAMED = {
    "red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "white": (255, 255, 255), "purple": (128, 0, 128), "orange": (255, 165, 0),
}
CANON = re.compile(
    r"(a|two|three) (small|large) (\w+) (circle|square|triangle|cross)(?:s|es)? "
    r"(on the left|on the right|at the top|at the bottom|in the center)"
)


def _load(json_path: Path) -> dict:
    return json.loads(json_path.read_text(encoding="utf-8"))


def _canonical(image: dict) -> str:
    """The dominant caption: the canonical phrasing appears at least twice among the five."""
    return Counter(" ".join(s["tokens"]) for s in image["sentences"]).most_common(1)[0][0]


def _components(mask: np.ndarray, min_area: int = 60) -> list[np.ndarray]:
    """4-connected components of a boolean mask as (k, 2) arrays of (y, x); specks below min_area dropped."""
    seen = np.zeros_like(mask)
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) >= min_area:
            found.append(np.array(pixels))
    return found


def _classify_shape(pixels: np.ndarray) -> str:
    """Shape from the fill of the bounding box and the width of a row near its bottom."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(pixels) / (h * w)
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    # Width near the bottom (not the last rows: JPEG ringing blurs them): ~90% for a triangle, ~33% for a cross.
    row = ys.min() + int(0.9 * h)
    low = np.count_nonzero(ys == row) / w
    return "triangle" if low > 0.65 else "cross"


def _in_region(cy: float, cx: float, region: str) -> bool:
    return {
        "on the left": cx < 0.47, "on the right": cx > 0.53, "at the top": cy < 0.47,
        "at the bottom": cy > 0.53, "in the center": 0.15 < cx < 0.85 and 0.3 < cy < 0.7,
    }[region]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return make_synth_dataset(tmp_path_factory.mktemp("synth") / "out", 60, seed=3)


def test_same_seed_gives_identical_bytes_and_prefix_is_stable(tmp_path):
    a = make_synth_dataset(tmp_path / "a", 8, seed=5)
    b = make_synth_dataset(tmp_path / "b", 8, seed=5)
    assert a == tmp_path / "a" / "dataset_synth.json"
    assert a.read_bytes() == b.read_bytes()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    # More images leave the earlier ones (pixels and captions) unchanged.
    c = make_synth_dataset(tmp_path / "c", 12, seed=5)
    for old, new in zip(_load(a)["images"], _load(c)["images"][:8]):
        assert old["sentences"] == new["sentences"]
        assert (tmp_path / "a" / "images" / old["filename"]).read_bytes() == \
            (tmp_path / "c" / "images" / new["filename"]).read_bytes()


def test_different_seed_differs(tmp_path):
    a = make_synth_dataset(tmp_path / "a", 8, seed=0)
    b = make_synth_dataset(tmp_path / "b", 8, seed=1)
    assert a.read_bytes() != b.read_bytes()
    assert (tmp_path / "a/images/000000.jpg").read_bytes() != (tmp_path / "b/images/000000.jpg").read_bytes()


def test_karpathy_format(small_set):
    data = _load(small_set)
    assert data["dataset"] == "synth"
    images = data["images"]
    assert [im["imgid"] for im in images] == list(range(60))
    sentids = []
    for im in images:
        assert set(im) >= {"filepath", "filename", "imgid", "split", "sentids", "sentences"}
        assert (small_set.parent / im["filepath"] / im["filename"]).is_file()
        assert im["split"] in ("train", "val", "test")
        assert len(im["sentences"]) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"]
            assert 4 <= len(s["tokens"]) <= 25
            assert all(re.fullmatch(r"[a-z]+", t) for t in s["tokens"]), s["tokens"]
            assert s["raw"].lower().rstrip(".").split() == s["tokens"]
            sentids.append(s["sentid"])
        # One dominant phrasing: the canonical caption appears at least twice.
        assert Counter(" ".join(s["tokens"]) for s in im["sentences"]).most_common(1)[0][1] >= 2
    assert len(set(sentids)) == len(sentids)
    assert Counter(im["split"] for im in images) == {"train": 48, "val": 6, "test": 6}


@pytest.mark.parametrize("n", [3, 4, 7])
def test_every_split_gets_an_image_when_small(tmp_path, n):
    data = _load(make_synth_dataset(tmp_path, n, seed=2))
    assert {im["split"] for im in data["images"]} == {"train", "val", "test"}


def test_split_counts():
    assert split_counts(1, (0.8, 0.1, 0.1)) == (1, 0, 0)
    assert split_counts(3, (0.8, 0.1, 0.1)) == (1, 1, 1)
    assert split_counts(2000, (0.8, 0.1, 0.1)) == (1600, 200, 200)
    assert split_counts(3, (0.1, 0.5, 0.4)) == (1, 1, 1)
    assert split_counts(10, (1.0, 0.0, 0.0)) == (10, 0, 0)


def test_images_are_rgb_jpegs(small_set, tmp_path):
    for im in _load(small_set)["images"][:20]:
        with Image.open(small_set.parent / im["filepath"] / im["filename"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (256, 256)
    path = make_synth_dataset(tmp_path, 2, seed=0, image_size=64)
    with Image.open(path.parent / "images" / "000001.jpg") as img:
        assert img.size == (64, 64)


def test_canonical_caption_matches_pixels(small_set):
    """Count, size, colour, shape and position of every group, and the background, measured from the file."""
    n_two_groups = 0
    for im in _load(small_set)["images"]:
        pixels = np.asarray(Image.open(small_set.parent / im["filepath"] / im["filename"]).convert("RGB"), dtype=np.float32)
        side = pixels.shape[0]
        border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3)])
        bg = np.median(border, axis=0)
        bg_word = "black" if bg.mean() < 50 else "gray"
        assert bg_word == "black" or 80 < bg.mean() < 140, bg
        mask = np.linalg.norm(pixels - bg, axis=2) > 70
        comps = _components(mask)

        groups = CANON.findall(_canonical(im))
        assert groups and " and ".join(" ".join(g) for g in groups).count(" ") > 0
        n_two_groups += len(groups) == 2
        assert sum({"a": 1, "two": 2, "three": 3}[g[0]] for g in groups) == len(comps), (im["filename"], groups)
        for det, size, colour, shape, region in groups:
            mine = [c for c in comps if _in_region(c[:, 0].mean() / side, c[:, 1].mean() / side, region)]
            assert len(mine) == {"a": 1, "two": 2, "three": 3}[det], (im["filename"], region)
            for comp in mine:
                ys, xs = comp[:, 0], comp[:, 1]
                extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
                assert (extent > 0.22 * side) == (size == "large"), (im["filename"], extent, size)
                assert _classify_shape(comp) == shape, (im["filename"], shape)
                median = np.median(pixels[ys, xs], axis=0)
                nearest = min(NAMED, key=lambda k: float(np.sum((median - np.array(NAMED[k])) ** 2)))
                assert nearest == colour, (im["filename"], median, colour)
        # Every caption names the same colours, and a background word (if any) is the measured one.
        canon_colours = {g[2] for g in groups}
        for s in im["sentences"]:
            assert {t for t in s["tokens"] if t in NAMED} == canon_colours
            assert not ({"black", "gray"} & set(s["tokens"])) - {bg_word}
    assert n_two_groups > 0  # the spot check covered two-group scenes too


def test_vocabulary_small_and_every_word_frequent(tmp_path):
    data = _load(make_synth_dataset(tmp_path, 1000, seed=0, image_size=64))
    captions = [s["tokens"] for im in data["images"] for s in im["sentences"]]
    freq = Counter(t for c in captions for t in c)
    assert 30 <= len(freq) <= 60
    assert min(freq.values()) > 5, freq.most_common()[-5:]
    vocab = Vocab.build(captions, min_word_freq=5)
    assert all(vocab.unk not in vocab.encode(c) for c in captions)


def test_bad_arguments(tmp_path):
    for n in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="n_images"):
            make_synth_dataset(tmp_path / "x", n)
    with pytest.raises(ValueError, match="seed"):
        make_synth_dataset(tmp_path / "x", 2, seed=-1)
    with pytest.raises(ValueError, match="image_size"):
        make_synth_dataset(tmp_path / "x", 2, image_size=16)
    for splits in ((0.5, 0.5), (0.5, 0.3, 0.3), (0.0, 0.5, 0.5), (0.8, -0.1, 0.3), "abc", None):
        with pytest.raises(ValueError, match="splits"):
            make_synth_dataset(tmp_path / "x", 2, splits=splits)
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(ValueError, match=re.escape(str(a_file))):
        make_synth_dataset(a_file, 2)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "images").write_text("in the way")
    with pytest.raises(ValueError, match="images"):
        make_synth_dataset(tmp_path / "d", 2)


def test_existing_directory_is_overwritten(tmp_path):
    make_synth_dataset(tmp_path, 5, seed=0)
    (tmp_path / "notes.txt").write_text("kept")
    path = make_synth_dataset(tmp_path, 3, seed=1)
    data = _load(path)
    assert len(data["images"]) == 3
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file
    fresh = make_synth_dataset(tmp_path / "fresh", 3, seed=1)
    assert path.read_bytes() == fresh.read_bytes()
    assert (tmp_path / "images/000002.jpg").read_bytes() == (tmp_path / "fresh/images/000002.jpg").read_bytes()
