"""A synthetic captioning dataset: rendered scenes of simple shapes with truthful template captions.

Torch-free (numpy + Pillow). `make_synth_dataset` writes `OUT/images/000000.jpg ...` and the
Karpathy-split JSON `OUT/dataset_synth.json` that the training code reads like `dataset_coco.json`.

Designed to be learnable in minutes by a small Show-Attend-Tell model:
- 1 or 2 groups of 1-3 identical objects (shape, colour, size), groups in disjoint image regions, no
  overlaps, objects at least ~1/6 of the image side so they survive the encoder's 32x downsampling;
- ~55 words, each frequent; 2 of the 5 captions are the canonical phrasing
  ("two large red circles on the left"), the other 3 come from distinct templates with synonyms, so one
  dominant caption exists per scene and BLEU against the 5 references rewards learning it.
Left/right/top/bottom are part of the captions: training on this data must not flip images.

Determinism: image i depends only on (seed, i) through its own numpy Generator, so the same seed gives
byte-identical JSON and images, and a larger n_images keeps earlier images unchanged.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from captrt.checks import check_int

JSON_NAME = "dataset_synth.json"
IMAGE_DIR = "images"
SPLITS = ("train", "val", "test")
JPEG_QUALITY = 90
CAPTIONS_PER_IMAGE = 5

# Saturated, mutually distant colours; all far (> 100 in RGB) from both backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 190, 50),
    "blue": (40, 80, 230),
    "yellow": (245, 235, 30),
    "white": (245, 245, 245),
    "purple": (150, 50, 200),
    "orange": (250, 130, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (15, 15, 15), "gray": (110, 110, 110)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.16, "large": 0.28}  # object side as a fraction of the image side
NUMBERS = {1: "one", 2: "two", 3: "three"}

# Region boxes (x0, y0, x1, y1) as fractions of the image, and the axis a group is laid out along.
# Halves keep a margin from the centre line so "left" objects are clearly left.
REGIONS: dict[str, tuple[tuple[float, float, float, float], str]] = {
    "left": ((0.03, 0.03, 0.47, 0.97), "v"),
    "right": ((0.53, 0.03, 0.97, 0.97), "v"),
    "top": ((0.03, 0.03, 0.97, 0.47), "h"),
    "bottom": ((0.03, 0.53, 0.97, 0.97), "h"),
    "center": ((0.15, 0.30, 0.85, 0.70), "h"),
}
PAIRS = (("left", "right"), ("top", "bottom"))  # two-group scenes, in canonical caption order

# Caption vocabulary. Canonical words come first in each synonym list.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "cross": (("cross", "crosses"),),
}
# The last phrase of each is long: two-group captions leave it out to stay short.
POSITION_WORDS = {
    "left": ("on the left", "on the left side", "in the left half", "in the left part of the image"),
    "right": ("on the right", "on the right side", "in the right half", "in the right part of the image"),
    "top": ("at the top", "in the top half", "near the top", "in the upper part of the image"),
    "bottom": ("at the bottom", "in the bottom half", "near the bottom", "in the lower part of the image"),
    "center": ("in the center", "in the middle", "near the center", "in the middle of the image"),
}
TEMPLATES = ("there", "plain", "background", "image_with", "fronted", "shows")

P_TWO_GROUPS = 0.3
COUNT_PROBS = (0.45, 0.30, 0.25)  # one, two, three objects per group


@dataclass(frozen=True)
class Group:
    """count identical objects (shape, colour, size) laid out inside one region."""

    count: int
    size: str
    colour: str
    shape: str
    region: str


@dataclass(frozen=True)
class Scene:
    background: str
    groups: tuple[Group, ...]  # in canonical caption order


# ----------------------------------------------------------------------------------------------- scenes

def _fits(count: int, size: str, region: str) -> bool:
    """Whether count objects of this size fit in the region's slots with a gap (5% of the object)."""
    (x0, y0, x1, y1), axis = REGIONS[region]
    long_side, short_side = (y1 - y0, x1 - x0) if axis == "v" else (x1 - x0, y1 - y0)
    need = (SIZES[size] + 0.01) * 1.05  # + the largest size jitter
    return long_side / count >= need and short_side >= need


def _sample_group(rng: np.random.Generator, region: str) -> Group:
    count = int(rng.choice(3, p=COUNT_PROBS)) + 1
    size = str(rng.choice(list(SIZES)))
    if not _fits(count, size, region):
        size = "small"  # only three large objects in the centre band do not fit
    return Group(count, size, str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), region)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: background and 1-2 groups in disjoint regions (two groups differ in colour or shape)."""
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < P_TWO_GROUPS:
        first, second = PAIRS[int(rng.integers(len(PAIRS)))]
        a = _sample_group(rng, first)
        b = _sample_group(rng, second)
        while (b.colour, b.shape) == (a.colour, a.shape):
            b = _sample_group(rng, second)
        return Scene(background, (a, b))
    return Scene(background, (_sample_group(rng, str(rng.choice(list(REGIONS)))),))


# --------------------------------------------------------------------------------------------- rendering

def _layout(group: Group, side: float, image_size: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres in pixels: one slot per object along the region's long axis, jittered within the slot."""
    (x0, y0, x1, y1), axis = REGIONS[group.region]
    if axis == "h":
        along, across = (x0, x1), (y0, y1)
    else:
        along, across = (y0, y1), (x0, x1)
    slot = (along[1] - along[0]) / group.count
    centres = []
    for k in range(group.count):
        # Jitter uses 40% of the free space, so objects stay well inside their slot and region.
        a = along[0] + slot * (k + 0.5) + rng.uniform(-1, 1) * 0.4 * (slot - side) / 2
        c = (across[0] + across[1]) / 2 + rng.uniform(-1, 1) * 0.4 * (across[1] - across[0] - side) / 2
        centres.append((a, c) if axis == "h" else (c, a))
    return [(x * image_size, y * image_size) for x, y in centres]


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float,
                 colour: tuple[int, int, int]) -> None:
    """Draw one filled shape of side s pixels centred at (cx, cy)."""
    h = s / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=colour)
    elif shape == "cross":
        t = s / 6  # arm half-thickness: arms are a third of the side
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=colour)
    else:
        raise ValueError(f"synth: unknown shape {shape!r}")


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """RGB image (image_size x image_size): noisy, faintly graded background, then the objects."""
    n = image_size
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.int16)
    # A faint linear gradient plus uniform pixel noise in [-8, 7] (low 4 bits of random bytes: ~4x
    # faster than Gaussian floats), so the background is textured rather than constant.
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    grad = (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]) * rng.uniform(0, 12)
    noise = (np.frombuffer(rng.bytes(n * n * 3), dtype=np.uint8).reshape(n, n, 3) & 15).astype(np.int16) - 8
    pixels = np.clip(base + grad.astype(np.int16)[:, :, None] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for group in scene.groups:
        side = SIZES[group.size] + rng.uniform(-0.01, 0.01)
        jitter = rng.integers(-8, 9, size=3)  # small: yellow and orange stay apart
        colour = tuple(int(v) for v in np.clip(np.asarray(COLOURS[group.colour]) + jitter, 0, 255))
        for cx, cy in _layout(group, side, n, rng):
            _draw_object(draw, group.shape, cx, cy, side * n, colour)
    return image


# -------------------------------------------------------------------------------------------- captions

def _noun_phrase(g: Group, rng: np.random.Generator | None) -> str:
    """'a large red circle' / 'two small blue squares'; rng=None gives the canonical words."""
    if rng is None:
        det = "a" if g.count == 1 else NUMBERS[g.count]
        size, (singular, plural) = g.size, SHAPE_WORDS[g.shape][0]
    else:
        size = str(rng.choice(SIZE_WORDS[g.size])) if rng.random() >= 0.2 else ""  # sometimes omitted
        singular, plural = SHAPE_WORDS[g.shape][int(rng.integers(len(SHAPE_WORDS[g.shape])))]
        if g.count == 1:
            det = "one" if not size or rng.random() < 0.4 else "a"  # "one" avoids "a orange"
        elif g.count == 2 and rng.random() < 0.3:
            det = "a pair of"
        else:
            det = NUMBERS[g.count]
    noun = singular if g.count == 1 else plural
    return " ".join(w for w in (det, size, g.colour, noun) if w)


def render_scenes(count: int, size: int, seed: int, key: tuple[int, ...] = ()) -> np.ndarray:
    """(count, size, size, 3) uint8 random scenes without captions, for parity, calibration and
    benchmarks. Scene i draws from SeedSequence(seed, spawn_key=(*key, i)): deterministic, and
    different callers pick different `key`s to get different images."""
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*key, i)))
        out[i] = np.asarray(render_scene(sample_scene(rng), size, rng).convert("RGB"), dtype=np.uint8)
    return out


def _position(g: Group, rng: np.random.Generator | None, short: bool = False) -> str:
    words = POSITION_WORDS[g.region]
    if rng is None:
        return words[0]
    return str(rng.choice(words[:-1] if short else words))


def canonical_caption(scene: Scene) -> str:
    """The dominant phrasing: '<noun phrase> <position>' per group, joined by 'and'."""
    return " and ".join(f"{_noun_phrase(g, None)} {_position(g, None)}" for g in scene.groups)


def _variant(scene: Scene, template: str, rng: np.random.Generator) -> str:
    """One caption from a non-canonical template with random synonyms (always truthful)."""
    short = len(scene.groups) > 1
    parts = [(_noun_phrase(g, rng), _position(g, rng, short)) for g in scene.groups]
    described = " and ".join(f"{np_} {pos}" for np_, pos in parts)
    verb = "is" if parts[0][0].split()[0] in ("a", "one") else "are"  # "there is a pair of ..."
    if template == "there":
        return f"there {verb} {described}"
    if template == "plain":
        return described
    if template == "background":
        return f"{described} on a {scene.background} background"
    if template == "image_with":
        return f"a {scene.background} {rng.choice(('image', 'picture'))} with {described}"
    if template == "fronted":
        first = f"{parts[0][1]} there {verb} {parts[0][0]}"
        return " and ".join([first] + [f"{pos} {np_}" for np_, pos in parts[1:]])
    if template == "shows":
        return f"the {rng.choice(('image', 'picture'))} shows {described}"
    raise ValueError(f"synth: unknown template {template!r}")


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five captions: the canonical one twice and three distinct variant templates, shuffled."""
    canon = canonical_caption(scene)
    templates = rng.choice(TEMPLATES, size=CAPTIONS_PER_IMAGE - 2, replace=False)
    captions = [canon, canon] + [_variant(scene, str(t), rng) for t in templates]
    return [captions[i] for i in rng.permutation(len(captions))]


# ---------------------------------------------------------------------------------------------- splits

def split_counts(n_images: int, splits: Sequence[float]) -> tuple[int, int, int]:
    """(train, val, test) sizes; with n_images >= 3 every split with a positive fraction gets >= 1 image."""
    if n_images < 3:
        return n_images, 0, 0
    val, test = (round(n_images * f) for f in splits[1:])
    val = max(1, val) if splits[1] > 0 else 0
    test = max(1, test) if splits[2] > 0 else 0
    while n_images - val - test < 1:  # keep at least one training image
        if val >= test and val > 1:
            val -= 1
        else:
            test -= 1
    return n_images - val - test, val, test


def assign_splits(n_images: int, seed: int, splits: Sequence[float]) -> list[str]:
    """Split name per image: a seeded permutation, so splits are interleaved over the index range."""
    n_train, n_val, _ = split_counts(n_images, splits)
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(n_images)
    names = ["test"] * n_images
    for rank, idx in enumerate(order):
        names[int(idx)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return names


# ----------------------------------------------------------------------------------------------- writer

def _check_args(n_images: object, seed: object, splits: object, image_size: object) -> tuple[float, float, float]:
    check_int("synth: n_images", n_images)
    check_int("synth: seed", seed, low=0)
    check_int("synth: image_size", image_size, low=32)
    try:
        fracs = tuple(float(f) for f in splits)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"synth: splits must be three numbers (train, val, test), got {splits!r}") from None
    if len(fracs) != 3 or any(not math.isfinite(f) or f < 0 for f in fracs):
        raise ValueError(f"synth: splits must be three non-negative numbers (train, val, test), got {splits!r}")
    if abs(sum(fracs) - 1.0) > 1e-6 or fracs[0] <= 0:
        raise ValueError(f"synth: splits must sum to 1 with a positive train fraction, got {splits!r}")
    return fracs  # type: ignore[return-value]


def _write_json_atomic(path: Path, data: dict) -> None:
    """Temp file beside `path`, then os.replace: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_synth_dataset(out_dir: str | os.PathLike, n_images: int, seed: int = 0,
                       splits: Sequence[float] = (0.8, 0.1, 0.1), image_size: int = 256) -> Path:
    """Render n_images scenes into OUT/images/ and write OUT/dataset_synth.json; return the JSON path.

    An existing directory is reused: files of the same names are overwritten, other files are left
    alone (the JSON lists exactly the images of this dataset). Raises ValueError on bad arguments or
    when OUT (or OUT/images) exists and is not a directory.
    """
    fracs = _check_args(n_images, seed, splits, image_size)
    n_images, seed, image_size = int(n_images), int(seed), int(image_size)
    out = Path(out_dir)
    image_dir = out / IMAGE_DIR
    for d in (out, image_dir):
        if d.exists() and not d.is_dir():
            raise ValueError(f"{d}: exists and is not a directory")
    image_dir.mkdir(parents=True, exist_ok=True)

    width = max(6, len(str(n_images - 1)))
    split_names = assign_splits(n_images, seed, fracs)
    images = []
    for i in range(n_images):
        # Per-image generator keyed by (seed, i): earlier images do not depend on n_images.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, i)))
        scene = sample_scene(rng)
        filename = f"{i:0{width}d}.jpg"
        render_scene(scene, image_size, rng).save(image_dir / filename, "JPEG", quality=JPEG_QUALITY)
        sentences = []
        for j, caption in enumerate(scene_captions(scene, rng)):
            raw = caption[0].upper() + caption[1:] + "."
            sentences.append({"tokens": caption.split(), "raw": raw, "imgid": i, "sentid": i * CAPTIONS_PER_IMAGE + j})
        images.append({
            "filepath": IMAGE_DIR,
            "filename": filename,
            "imgid": i,
            "split": split_names[i],
            "sentids": [s["sentid"] for s in sentences],
            "sentences": sentences,
        })
    json_path = out / JSON_NAME
    _write_json_atomic(json_path, {"dataset": "synth", "images": images})
    return json_path
