"""Write checkpoints the way sgrvinod's tutorial does.

    python make_tutorial_checkpoint.py MODELS_DIR OUT REF [options]   # or MODELS_DIR JOBS.json

MODELS_DIR holds a copy of tutorial_models.py named models.py, so the classes pickle as ``models.*``.
"""

import os
import sys

import torch
import torchvision


def save_checkpoint(filename, epoch, epochs_since_improvement, encoder, decoder, encoder_optimizer,
                    decoder_optimizer, bleu4):
    """The tutorial's utils.save_checkpoint (its file name is built from data_name; passed in here)."""
    state = {'epoch': epoch,
             'epochs_since_improvement': epochs_since_improvement,
             'bleu-4': bleu4,
             'encoder': encoder,
             'decoder': decoder,
             'encoder_optimizer': encoder_optimizer,
             'decoder_optimizer': decoder_optimizer}
    torch.save(state, filename)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.abspath(sys.argv.pop(1)))
    import models  # noqa: E402  (the copy in MODELS_DIR)
    from fixture_common import run_jobs  # noqa: E402

    def build_models(args):
        encoder = models.Encoder(args.enc_size, getattr(torchvision.models, args.backbone))
        encoder.fine_tune(args.fine_tune)
        decoder = models.DecoderWithAttention(args.dim, args.dim + 2, args.dim + 4, args.vocab,
                                              encoder_dim=args.encoder_dim)
        return encoder, decoder

    run_jobs(build_models, save_checkpoint)
