"""The seed notebook's model classes, as the notebook defines them, plus a __main__ driver.

Run as a script so the classes pickle as ``__main__.ImageEncoder`` etc., exactly like a
checkpoint written from the notebook:

    python seed_classes.py OUT.pth REF.pt --backbone resnet18 --enc-size 4 --dim 16 --vocab 20
    python seed_classes.py JOBS.json      # a list of such argument lists, one torch import

OUT.pth is the notebook's ``save_checkpoint`` dict (whole pickled modules and optimizers);
REF.pt holds the same weights as plain state dicts for the tests to compare against.

Differences from the notebook, all outside what gets pickled:
- ``torchvision.models.resnet101(pretrained=True)`` cannot run offline / on this torchvision,
  so ImageEncoder takes the ResNet constructor as an argument and calls it with ``weights=None``.
- The notebook's text shows ``init_hidden_state``/``forward`` dedented and a few garbled tokens
  (``batch size = encoder out.size(0)``, ``self.decode step``) from its export; here they are
  methods of DecoderWithAttention, and ``encoder_dim``/``vocab_size``/``device`` (notebook
  globals) are read from the instance.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class ImageEncoder(nn.Module):
    def __init__(self, enc_image_size=14, backbone=torchvision.models.resnet101):
        super(ImageEncoder, self).__init__()
        self.enc_image_size = enc_image_size
        # pretrained ImageNet ResNet-101 in the notebook; weights=None here (no network in tests)
        resnet = backbone(weights=None)
        # remove linear and pool layers
        modules = list(resnet.children())[:-2]
        self.resnet = nn.Sequential(*modules)
        # resize image to fixed size using adaptive pool to allow input images of variable size
        self.adaptive_pool = nn.AdaptiveAvgPool2d((enc_image_size, enc_image_size))
        self.fine_tune()

    def fine_tune(self, fine_tune=True):
        for param in self.resnet.parameters():
            param.requires_grad = False
        # if fine-tuning, fine-tune convolutional blocks 2 through 4
        for child in list(self.resnet.children())[5:]:
            for param in child.parameters():
                param.requires_grad = fine_tune

    def forward(self, images):
        out = self.resnet(images)  # (batch_size, 2048, image_size/32, image_size/32)
        out = self.adaptive_pool(out)  # (batch_size, 2048, enc_image_size, enc_image_size)
        out = out.permute(0, 2, 3, 1)  # (batch_size, enc_image_size, enc_image_size, 2048)
        return out


class BahdanauAttention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super(BahdanauAttention, self).__init__()
        self.encoder_attn = nn.Linear(encoder_dim, attention_dim)  # linear layer to transform encoder's output
        self.decoder_attn = nn.Linear(decoder_dim, attention_dim)  # linear layer to transform decoder's output
        self.full_attn = nn.Linear(attention_dim, 1)

    def forward(self, encoder_out, decoder_hidden):
        attn1 = self.encoder_attn(encoder_out)  # (batch_size, num_pixels, attention_dim)
        attn2 = self.decoder_attn(decoder_hidden)  # (batch_size, attention_dim)
        attn = self.full_attn(F.relu(attn1 + attn2.unsqueeze(1)))  # (batch_size, num_pixels, 1)
        alpha = F.softmax(attn, dim=1)  # (batch_size, num_pixels, 1)
        attn_weighted_encoding = (encoder_out * alpha).sum(dim=1)  # (batch_size, encoder_dim)
        alpha = alpha.squeeze(2)  # (batch_size, num_pixels)
        return attn_weighted_encoding, alpha


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super(DecoderWithAttention, self).__init__()
        self.encoder_dim = encoder_dim
        self.attention_dim = attention_dim
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.vocab_size = vocab_size
        self.dropout = dropout
        self.attention = BahdanauAttention(encoder_dim, decoder_dim, attention_dim)  # attention network
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # embedding layer
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)  # decoding LSTMCell
        self.init_h = nn.Linear(encoder_dim, decoder_dim)  # linear layer to find initial hidden state of LSTMCell
        self.init_c = nn.Linear(encoder_dim, decoder_dim)  # linear layer to find initial cell state of LSTMCell
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # linear layer to create a sigmoid-activated gate
        self.fc = nn.Linear(decoder_dim, vocab_size)  # linear layer to find scores over vocabulary
        self.init_weights()  # initialize some layers with the uniform distribution

    def init_weights(self):
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden_state(self, encoder_out):
        mean_encoder_out = encoder_out.mean(dim=1)  # (batch_size, encoder_dim)
        h = self.init_h(mean_encoder_out)  # (batch_size, decoder_dim)
        c = self.init_c(mean_encoder_out)  # (batch_size, decoder_dim)
        return h, c

    def forward(self, encoder_out, encoded_captions, caption_lens):
        batch_size = encoder_out.size(0)
        encoder_out = encoder_out.view(batch_size, -1, self.encoder_dim)  # (batch_size, num_pixels, encoder_dim)
        num_pixels = encoder_out.size(1)
        caption_lens, sort_idx = caption_lens.squeeze(1).sort(dim=0, descending=True)
        encoder_out = encoder_out[sort_idx]
        encoded_captions = encoded_captions[sort_idx]
        embeddings = self.embedding(encoded_captions)  # (batch_size, max_caption_length, embed_dim)
        h, c = self.init_hidden_state(encoder_out)  # (batch_size, decoder_dim)
        decode_lens = (caption_lens - 1).tolist()
        predictions = torch.zeros(batch_size, max(decode_lens), self.vocab_size).to(encoder_out.device)
        alphas = torch.zeros(batch_size, max(decode_lens), num_pixels).to(encoder_out.device)
        for t in range(max(decode_lens)):
            batch_size_t = sum([l > t for l in decode_lens])
            attention_weighted_encoding, alpha = self.attention(encoder_out[:batch_size_t], h[:batch_size_t])
            gate = torch.sigmoid(self.f_beta(h[:batch_size_t]))  # sigmoid gating scalar, (batch_size_t, encoder_dim)
            attention_weighted_encoding = gate * attention_weighted_encoding
            h, c = self.decode_step(
                torch.cat([embeddings[:batch_size_t, t, :], attention_weighted_encoding], dim=1),
                (h[:batch_size_t], c[:batch_size_t]))  # (batch_size_t, decoder_dim)
            preds = self.fc(self.dropout(h))  # (batch_size_t, vocab_size)
            predictions[:batch_size_t, t, :] = preds
            alphas[:batch_size_t, t, :] = alpha
        return predictions, encoded_captions, decode_lens, alphas, sort_idx


def save_checkpoint(filename, epoch, epochs_since_improvement, encoder, decoder, encoder_optimizer,
                    decoder_optimizer, bleu4):
    """The notebook's save_checkpoint, with the file name passed in."""
    state = {
        'epoch': epoch,
        'epochs_since_improvement': epochs_since_improvement,
        'bleu-4': bleu4,
        'encoder': encoder,
        'decoder': decoder,
        'encoder_optimizer': encoder_optimizer,
        'decoder_optimizer': decoder_optimizer,
    }
    torch.save(state, filename)


def build_models(args):
    """The notebook's construction: encoder.fine_tune(fine_tune_encoder), then the decoder."""
    encoder = ImageEncoder(args.enc_size, getattr(torchvision.models, args.backbone))
    encoder.fine_tune(args.fine_tune)
    decoder = DecoderWithAttention(args.dim, args.dim + 2, args.dim + 4, args.vocab, encoder_dim=args.encoder_dim)
    return encoder, decoder


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fixture_common import run_jobs

    run_jobs(build_models, save_checkpoint)
