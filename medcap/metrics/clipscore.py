"""CLIPScore and RefCLIPScore (Hessel et al. 2021) with a local open_clip model (a folder with
``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``, e.g. a CLIP or
BiomedCLIP download). A Hugging Face text tower (BiomedCLIP's) must be local too: its ``text_cfg.hf_model_name`` a
local folder of that model and its tokenizer files in the open_clip folder, where open_clip reads them.
CLIPScore = 2.5 * max(cos(image, caption), 0); RefCLIPScore = the harmonic mean of CLIPScore and
max(max over references of cos(caption, reference), 0)."""

from pathlib import Path

import numpy as np
import torch

from medcap.data.images import load_image
from medcap.models.tensor_files import read_json


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def check_local_text_tower(config: Path) -> None:
    """A ValueError naming ``config`` and the key when its Hugging Face text tower would be fetched from a hub
    (open_clip resolves ``hf_model_name`` with transformers, which downloads a hub name)."""
    text = read_json(config).get("model_cfg", {}).get("text_cfg", {})
    name = text.get("hf_model_name")
    if name and not Path(name).is_dir():
        raise ValueError(f"{config}: text_cfg.hf_model_name {name!r} is not a local folder; medcap never downloads: "
                         f"set it to a local copy of that model (its config.json is enough)")
    if text.get("hf_tokenizer_name") and not any((config.parent / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{config}: text_cfg.hf_tokenizer_name is set, and open_clip reads that tokenizer from "
                         f"this folder, which has none of {list(TOKENIZER_FILES)}: copy the tokenizer files of "
                         f"{text['hf_tokenizer_name']!r} here")


class ClipScore:
    def __init__(self, model: str | Path, weight: float = 2.5, batch_size: int = 32, device: str = "cpu"):
        import open_clip

        path = Path(model)
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"CLIPScore model: expected an open_clip folder with open_clip_config.json, "
                                    f"found {path}")
        check_local_text_tower(path / "open_clip_config.json")
        name = f"local-dir:{path}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.weight, self.batch_size, self.device = weight, batch_size, device

    @torch.no_grad()
    def _text(self, texts: list[str]) -> torch.Tensor:
        parts = [self.model.encode_text(self.tokenizer(texts[i:i + self.batch_size]).to(self.device)).float()
                 for i in range(0, len(texts), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1).cpu()

    @torch.no_grad()
    def _images(self, paths: list[str | Path]) -> torch.Tensor:
        parts = []
        for i in range(0, len(paths), self.batch_size):
            batch = torch.stack([self.preprocess(load_image(p)) for p in paths[i:i + self.batch_size]])
            parts.append(self.model.encode_image(batch.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1).cpu()

    def score(self, captions: list[str], images: list[str | Path],
              references: list[list[str]] | None = None) -> dict[str, np.ndarray]:
        """Per-image ``CLIPScore`` and, with references, ``RefCLIPScore``."""
        text, image = self._text(captions), self._images(images)
        clip = (self.weight * (text * image).sum(-1).clamp(min=0)).double().numpy()
        out = {"CLIPScore": clip}
        if references is not None:
            flat = [r for refs in references for r in refs]
            ref_text = self._text(flat)
            ref_sim, start = np.zeros(len(captions)), 0
            for i, refs in enumerate(references):
                cos = (ref_text[start:start + len(refs)] @ text[i]).max().item()
                ref_sim[i], start = max(cos, 0.0), start + len(refs)
            denominator = clip + ref_sim
            out["RefCLIPScore"] = np.where(denominator > 0, 2 * clip * ref_sim / np.where(denominator > 0,
                                                                                         denominator, 1), 0.0)
        return out
