"""The PyTorch reference (captrt.train.reference) over many images, computed once per test module."""

from __future__ import annotations

import numpy as np


def reference_results(checkpoint, images: np.ndarray, beams, *, max_steps: int = 50, length_penalty: float = 0.0):
    """{beam: [ReferenceResult per image]}: the oracle, one image at a time, as the seed does it."""
    with torch_threads(1):
        return _reference_results(checkpoint, images, beams, max_steps, length_penalty)


def _reference_results(checkpoint, images, beams, max_steps, length_penalty):
    import torch

    from captrt.train import reference as ref
    from captrt.train.checkpoint import load_checkpoint
    from captrt.train.model import normalize_uint8

    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    v = ckpt.vocab
    x = normalize_uint8(torch.from_numpy(np.ascontiguousarray(images)))
    out = {}
    with torch.no_grad():  # encoder once per image, in batches (the search below is the oracle)
        feats = [f[None] for s in range(0, len(images), 16) for f in model.encoder(x[s:s + 16])]
    for beam in beams:
        if hasattr(ref, "reference_beam_search_features"):
            out[beam] = [ref.reference_beam_search_features(model.decoder, f, v.start, v.end, beam, max_steps,
                                                             length_penalty) for f in feats]
        else:
            out[beam] = [ref.reference_beam_search(model, x[i], v.start, v.end, beam, max_steps, length_penalty)
                         for i in range(len(images))]
    return out


class torch_threads:
    """Run torch with n intra-op threads inside the block (tiny models: threads only add overhead,
    and on a busy 2-core machine OpenMP waits make a 10 ms search take a second)."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)
