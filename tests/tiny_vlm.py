"""A self-contained tiny vision-language model for unit tests of the fusion, generation and training code."""

import torch
from torch import nn
from torchtune.models.llama3_2._component_builders import llama3_2

from medcap.models.projectors import build_projector
from medcap.models.vlm import VisionLanguageModel

VOCAB = 64
IMAGE_ID = VOCAB  # one past the vocabulary, as the real builders do
PAD, STOP = 0, 1


class PatchEncoder(nn.Module):
    """32x32 images -> 4 tokens of 16 (a 16x16 patch conv followed by BatchNorm)."""

    num_tokens, embed_dim, image_size = 4, 16, 32
    mean = std = (0.5, 0.5, 0.5)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, kernel_size=16, stride=16)
        self.norm = nn.BatchNorm2d(16)

    def forward(self, images):
        return self.norm(self.conv(images)).flatten(2).transpose(1, 2)


def tiny_vlm(trainable=None, projector="mlp2", seed=0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    decoder = llama3_2(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                       max_seq_len=256, intermediate_dim=64)
    encoder = PatchEncoder()
    return VisionLanguageModel(decoder, encoder, build_projector(projector, 16, 32), IMAGE_ID, trainable)


def sample_batch(batch_size=2, images_per_sample=1, text_len=6, seed=0):
    """Tokens: [image block][text], random text ids in 2..VOCAB-1 (0 = pad, 1 = stop)."""
    g = torch.Generator().manual_seed(seed)
    image_block = torch.full((batch_size, 4 * images_per_sample), IMAGE_ID)
    text = torch.randint(2, VOCAB, (batch_size, text_len), generator=g)
    tokens = torch.cat([image_block, text], dim=1)
    images = torch.randn(batch_size * images_per_sample, 3, 32, 32, generator=g)
    return tokens, images
