"""Image transforms: resize + centre crop equals open_clip's own evaluation transform, pad-to-square (LLaVA 1.5)
equals a hand-computed example, each encoder family has its model's default and a dataset key overrides it."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from medcap.data.dataset import CaptionDataset, ImageTransform, PadToSquare, image_transform
from medcap.models import encoders


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(97, 61), (50, 130)])
def test_crop_equals_open_clips_evaluation_transform(size):
    from open_clip.transform import image_transform as open_clip_transform

    encoder = encoders.tiny_vit()  # an open_clip tower: its default is open_clip's resize + centre crop
    assert encoder.resize_mode == "crop"
    image = noise_image(*size)
    ours = image_transform(encoder)(image)
    theirs = open_clip_transform(encoder.image_size, is_train=False, mean=encoder.mean, std=encoder.std)(image)
    assert ours.shape == theirs.shape == (3, encoder.image_size, encoder.image_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    squashed = image_transform(encoder, "squash")(image)
    assert (squashed - theirs).abs().max() > 0.1  # squashing is a different image


def test_pad_to_square_hand_computed():
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.5, 0.25)
    encoder = SimpleNamespace(image_size=4, mean=mean, std=std, resize_mode="pad")
    # a 4 x 1 image (one row): centred on a 4 x 4 square at row (4 - 1) // 2 = 1, as LLaVA's expand2square
    row = np.array([[[0, 0, 0], [255, 255, 255], [51, 102, 204], [10, 20, 30]]], dtype=np.uint8)
    out = image_transform(encoder)(Image.fromarray(row))  # already 4 x 4 after padding: the resize keeps it
    fill = (127, 63, 191)  # int(mean * 255) per channel, as LLaVA 1.5 computes the background
    expected = np.empty((3, 4, 4))
    for c in range(3):
        expected[c] = (fill[c] / 255 - mean[c]) / std[c]
        expected[c, 1] = (row[0, :, c] / 255 - mean[c]) / std[c]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)
    # a tall image is padded left and right; a square one is left alone
    tall = PadToSquare(fill)(Image.new("RGB", (2, 5), (9, 9, 9)))
    assert tall.size == (5, 5)
    assert np.asarray(tall)[:, :, 0].tolist() == [[127, 9, 9, 127, 127]] * 5
    square = Image.new("RGB", (3, 3))
    assert PadToSquare(fill)(square) is square


def test_pad_then_resize_keeps_the_aspect_ratio():
    encoder = SimpleNamespace(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = Image.new("RGB", (32, 8), (255, 255, 255))  # a white band, four times as wide as high
    out = ImageTransform(8, encoder.mean, encoder.std, "pad")(image)
    # padded to 32 x 32 (grey 127 above row 12 and below row 19), resized to 8 x 8: the bicubic filter reaches 8
    # source rows either side, so output rows 0 and 7 are pure grey, the middle rows bright, top and bottom alike
    grey = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(out[:, [0, 7]], torch.full((3, 2, 8), grey), atol=1e-6)
    assert (out[:, 3:5] > 0.8).all()
    torch.testing.assert_close(out, out.flip(1), rtol=0, atol=1e-6)
    assert torch.allclose(ImageTransform(8, encoder.mean, encoder.std, "squash")(image), torch.ones(3, 8, 8))
    assert image_transform(encoder).resize_mode == "squash"  # an encoder without resize_mode


def test_each_encoder_family_has_its_models_default(monkeypatch):
    assert encoders.tiny_vit().resize_mode == "crop"
    assert encoders.tiny_swin().resize_mode == "squash"  # as swin_base, R2GenGPT's image processor
    assert encoders.tiny_efficientnet().resize_mode == "squash"
    assert encoders.efficientnet_lite0(pretrained=False).resize_mode == "squash"  # the demo's, as trained
    # LLaVA 1.5's CLIP-336 pads (the tower itself is not built here: ViT-L takes seconds)
    tiny = encoders.tiny_vit()
    monkeypatch.setattr(encoders, "OpenClipEncoder", lambda **kwargs: copy.deepcopy(tiny))
    assert encoders.clip_vit_l14_336().resize_mode == "pad"
    assert encoders.biomedclip_vit_b16().resize_mode == "crop"
    with pytest.raises(ValueError, match="resize_mode must be one of \\('crop', 'pad', 'squash'\\), got 'fit'"):
        ImageTransform(8, (0, 0, 0), (1, 1, 1), "fit")


def test_a_dataset_key_overrides_the_encoders_resize_mode(tmp_path):
    noise_image(40, 20).save(tmp_path / "wide.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "image": "wide.png", "caption": "x"}) + "\n")
    from tests.test_formats import FakeTokenizer

    encoder = encoders.tiny_vit()
    options = dict(manifest=str(tmp_path / "m.jsonl"), tokenizer=FakeTokenizer(), tokens_per_image=1,
                   transform=image_transform(encoder))
    image = Image.open(tmp_path / "wide.png").convert("RGB")
    for mode in ("crop", "pad", "squash"):
        dataset = CaptionDataset(**options, resize_mode=mode)
        assert dataset.transform.resize_mode == mode
        torch.testing.assert_close(dataset[0]["images"][0], image_transform(encoder, mode)(image), rtol=0, atol=0)
    assert CaptionDataset(**options).transform.resize_mode == "crop"  # null: the encoder's
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        CaptionDataset(**options, resize_mode="stretch")
    with pytest.raises(ValueError, match="needs a transform that image_transform built"):
        CaptionDataset(**{**options, "transform": lambda image: image}, resize_mode="pad")
