"""Caption data sets read from a JSONL or CSV manifest, and the collate that batches them."""

import csv
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from medcap.data.images import load_image
from medcap.text import IGNORE_INDEX, build_sample

DEFAULT_PROMPT = "Describe the findings in this image."


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL (one object per line) or CSV manifest with ``id``, ``image`` (a path, or a list of paths;
    in CSV several paths are joined with ``;``), ``caption`` and optional ``prompt``. Relative image paths are
    resolved against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]
        for _, row in rows:
            row["image"] = [p for p in (row.get("image") or "").split(";") if p]
    else:
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((line_no, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
    samples, seen = [], set()
    for line_no, row in rows:
        sample_id = str(row.get("id") or "").strip()
        if not sample_id:
            raise ValueError(f"{path}:{line_no}: field 'id' is missing or empty")
        if sample_id in seen:
            raise ValueError(f"{path}:{line_no}: sample {sample_id!r}: duplicate id")
        seen.add(sample_id)
        images = row.get("image")
        images = [images] if isinstance(images, str) else list(images or [])
        if not images:
            raise ValueError(f"{path}:{line_no}: sample {sample_id!r}: field 'image' is missing or empty")
        samples.append({
            "id": sample_id,
            "images": [str(path.parent / p) for p in images],
            "caption": row.get("caption"),
            "prompt": row.get("prompt") or None,
        })
    return samples


def image_transform(encoder: torch.nn.Module) -> Callable:
    """Resize to the encoder's square input and normalise with the statistics its weights expect."""
    size = encoder.image_size
    return T.Compose([
        T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.ToTensor(),
        T.Normalize(encoder.mean, encoder.std),
    ])


class CaptionDataset(Dataset):
    """Image(s) + prompt -> caption samples. With ``with_captions=False`` (generation) only the prompt is
    tokenised and the caption field may be absent."""

    def __init__(
        self,
        manifest: str,
        tokenizer,
        tokens_per_image: int,
        transform: Callable,
        prompt: str = DEFAULT_PROMPT,
        system: str | None = None,
        max_seq_len: int = 512,
        with_captions: bool = True,
    ):
        self.manifest = manifest
        self.samples = read_manifest(manifest)
        self.tokenizer, self.tokens_per_image, self.transform = tokenizer, tokens_per_image, transform
        self.prompt, self.system, self.max_seq_len, self.with_captions = prompt, system, max_seq_len, with_captions
        if with_captions:
            for s in self.samples:
                if not isinstance(s["caption"], str) or not s["caption"].strip():
                    raise ValueError(f"{manifest}: sample {s['id']!r}: field 'caption' is missing or empty")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        prompt = s["prompt"] or self.prompt
        num_image_tokens = self.tokens_per_image * len(s["images"])
        if self.with_captions:
            sample = build_sample(self.tokenizer, prompt, s["caption"], num_image_tokens, self.max_seq_len, self.system)
        else:
            sample = {"tokens": self.tokenizer.prompt_ids(prompt, num_image_tokens, self.system)}
        images = []
        for image_path in s["images"]:
            try:
                images.append(self.transform(load_image(image_path)))
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.manifest}: sample {s['id']!r}: field 'image': {e}") from None
        return {"id": s["id"], "images": torch.stack(images), **sample}


def collate_captions(batch: list[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad tokens (and labels with IGNORE_INDEX) to the longest sample; concatenate all images along dim 0
    (the model fills placeholders in order, so samples may hold different numbers of images).
    ``padding_mask`` is True on real tokens. Generation uses left padding."""
    length = max(len(b["tokens"]) for b in batch)
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    padding_mask = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, b in enumerate(batch):
        n = len(b["tokens"])
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        tokens[row, span] = torch.tensor(b["tokens"])
        padding_mask[row, span] = True
        if "labels" in b:
            labels[row, span] = torch.tensor(b["labels"])
    out = {"ids": [b["id"] for b in batch], "tokens": tokens, "padding_mask": padding_mask,
           "images": torch.cat([b["images"] for b in batch])}
    if "labels" in batch[0]:
        out["labels"] = labels
    return out


def count_truncated(dataset: CaptionDataset) -> int:
    """How many samples had their caption cut to fit ``max_seq_len`` (tokenises every sample once)."""
    return sum(
        build_sample(dataset.tokenizer, s["prompt"] or dataset.prompt, s["caption"],
                     dataset.tokens_per_image * len(s["images"]), dataset.max_seq_len, dataset.system)["truncated"]
        for s in dataset.samples
    )


