"""The seed notebook's attention figure, one PNG per image.

Panels in rows of five: first the image (titled <start>), then one per word, the word as the title
and its attention map upsampled over the image (grey colormap, alpha 0.8), like the seed's
skimage.transform.pyramid_expand(upscale=24, sigma=8) on a 14x14 grid. matplotlib is imported lazily,
with the Agg canvas only (no pyplot, no global backend switch), so it is safe in servers and threads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from captrt.atomic import atomic_path

UPSCALE = 24  # pixels per grid cell, as in the seed (14 * 24 = 336)
COLUMNS = 5


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array (reflect padding), the smoothing of pyramid_expand."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(a.astype(np.float64), radius, mode="reflect")
    rows = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, padded)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, rows).astype(np.float32)


def upsample_attention(alpha: np.ndarray, upscale: int = UPSCALE, sigma: float | None = None) -> np.ndarray:
    """(g, g) attention -> (g*upscale, g*upscale) smooth map: bilinear resize, then Gaussian blur."""
    g = alpha.shape[0]
    size = g * upscale
    img = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32), mode="F")
    big = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return _gaussian_blur(big, sigma if sigma is not None else upscale / 3.0)


def plot_attention(image: np.ndarray | Image.Image, words: Sequence[str], attention: np.ndarray,
                   out_path: str | Path, *, upscale: int = UPSCALE, dpi: int = 80) -> Path:
    """Write the figure for one caption. image: uint8 (H, W, 3) or PIL; attention: (T, g, g), T = len(words)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("attention plots need matplotlib: pip install matplotlib") from None
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 3 or attention.shape[0] != len(words) or attention.shape[1] != attention.shape[2]:
        raise ValueError(f"attention must be (T, g, g) with T = {len(words)} words, got {attention.shape}")
    g = attention.shape[1]
    size = g * upscale
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    background = np.asarray(pil.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
    panels = 1 + len(words)
    rows = math.ceil(panels / COLUMNS)
    fig = Figure(figsize=(4 * COLUMNS, 4 * rows))
    FigureCanvasAgg(fig)
    for t in range(panels):
        ax = fig.add_subplot(rows, COLUMNS, t + 1)
        ax.imshow(background)
        if t == 0:
            ax.set_title("<start>", fontsize=12)
        else:
            ax.set_title(words[t - 1], fontsize=12)
            ax.imshow(upsample_attention(attention[t - 1], upscale), alpha=0.8, cmap="gray")
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_path)
    with atomic_path(out) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, format="png", dpi=dpi)
    return out
