"""Shared driver code for the legacy-checkpoint fixture scripts (run in a subprocess)."""

import argparse
import functools
import hashlib
import json
import sys

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("out", help="legacy checkpoint to write (whole pickled modules)")
    p.add_argument("ref", help="plain state dicts of the same weights, for comparison")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--enc-size", type=int, default=4)
    p.add_argument("--dim", type=int, default=16, help="attention_dim; embed/decoder dims are dim+2, dim+4")
    p.add_argument("--vocab", type=int, default=20)
    p.add_argument("--fine-tune", action="store_true", help="also make an encoder optimizer, as the seed does")
    p.add_argument("--legacy-format", action="store_true", help="torch.save's pre-1.6 (non-zip) format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--break-shape", action="store_true", help="give fc an input size the LSTM does not produce")
    args = p.parse_args(argv)
    args.encoder_dim = 512 if args.backbone in ("resnet18", "resnet34") else 2048
    return args


def run_jobs(build_models, save_checkpoint, argv=None) -> None:
    """CLI: one checkpoint from arguments, or several from a JSON list of argument lists
    (one subprocess for many checkpoints: importing torch dominates the run time)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            jobs = json.load(f)
    else:
        jobs = [argv]
    for job in jobs:
        args = parse_args(job)
        encoder, decoder = build_models(args)
        build_and_save(args, encoder, decoder, save_checkpoint)


def build_and_save(args: argparse.Namespace, encoder, decoder, save_checkpoint) -> None:
    """Make the weights non-trivial, take one Adam step, then save as the notebook/tutorial does."""
    torch.manual_seed(args.seed)
    if args.break_shape:
        decoder.fc = torch.nn.Linear(decoder.decoder_dim + 3, decoder.vocab_size)
    with torch.no_grad():
        for name, buf in encoder.named_buffers():
            if buf.is_floating_point():  # BatchNorm running stats: distinct from their init values
                buf.uniform_(0.5, 1.5)
            else:
                buf.fill_(3)  # num_batches_tracked
    dec_params = [p for p in decoder.parameters() if p.requires_grad]
    decoder_optimizer = torch.optim.Adam(params=dec_params, lr=4e-4)
    enc_params = [p for p in encoder.parameters() if p.requires_grad]
    encoder_optimizer = torch.optim.Adam(params=enc_params, lr=1e-4) if args.fine_tune else None
    # One decoder step so Adam's state holds tensors; the encoder optimizer (if any) stays unstepped
    # to keep the file small (its moments would triple the ResNet's size).
    for group in decoder_optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p) * 0.01
    decoder_optimizer.step()
    decoder_optimizer.zero_grad()
    real_save = torch.save
    if args.legacy_format:  # what torch < 1.6 (the tutorial's era) wrote; save_checkpoint calls torch.save
        torch.save = functools.partial(real_save, _use_new_zipfile_serialization=False)
    try:
        save_checkpoint(args.out, 7, 2, encoder, decoder, encoder_optimizer, decoder_optimizer, 0.2345)
    finally:
        torch.save = real_save
    ref = {"encoder": digests(encoder.state_dict()), "decoder": digests(decoder.state_dict())}
    if not args.break_shape:
        ref.update(reference_outputs(encoder, decoder, args.vocab))
    torch.save(ref, args.ref)


def tensor_digest(t: torch.Tensor) -> str:
    """Exact fingerprint of a tensor (dtype, shape, bytes): the ref files stay tiny even for ResNet-101."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digests(state: dict) -> dict:
    return {k: tensor_digest(v) for k, v in state.items()}


def reference_outputs(encoder, decoder, vocab_size: int) -> dict:
    """The original classes' own forward passes (eval mode) on a fixed input, to compare captrt against."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=gen)
    captions = torch.randint(0, vocab_size, (3, 7), generator=gen)
    lengths = torch.tensor([[5], [7], [6]])
    encoder.eval()
    decoder.eval()
    with torch.no_grad():
        enc_out = encoder(images)  # (N, G, G, E)
        predictions, _, decode_lens, alphas, sort_idx = decoder(enc_out, captions, lengths)
    return {"images": images, "captions": captions, "lengths": lengths, "enc_out": enc_out,
            "predictions": predictions, "alphas": alphas, "sort_idx": sort_idx}
