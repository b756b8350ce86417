"""BLEURT (Sellam et al. 2020) from a local checkpoint in the Hugging Face BERT layout: a folder with
``config.json`` (a ``BertForSequenceClassification`` with one label), the weights and the BERT WordPiece
tokenizer, as the converted BLEURT checkpoints ``Elron/bleurt-{tiny,base,large}-{128,512}`` are published.
The reference and the candidate are one sentence pair (``[CLS] reference [SEP] candidate [SEP]``) and the
regression head's output is the score. With several references a caption gets its best score.

The BLEURT-20 PyTorch ports (``lucadiliello/BLEURT-20*``, ``model_type: bleurt``) need the ``bleurt-pytorch``
package, which does not import with transformers 5; they are refused with that message."""

from pathlib import Path

import numpy as np
import torch

from medcap.models.tensor_files import read_json


class Bleurt:
    def __init__(self, model: str | Path, batch_size: int = 32, max_length: int | None = None, device: str = "cpu"):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"BLEURT model: expected a Hugging Face folder with config.json, found {path}")
        if read_json(path / "config.json").get("model_type") == "bleurt":
            raise ValueError(f"BLEURT model {path}: config.json has model_type 'bleurt' (a BLEURT-20 PyTorch port), "
                             f"which needs the bleurt-pytorch package; it does not import with transformers 5. Use "
                             f"a BLEURT checkpoint in the BERT layout (e.g. Elron/bleurt-base-512)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.num_labels != 1:
            raise ValueError(f"BLEURT model {path}: a BLEURT checkpoint regresses one score, this one has "
                             f"{config.num_labels} labels")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        self.model.eval().to(device)
        self.max_length = max_length or min(self.tokenizer.model_max_length, config.max_position_embeddings)
        self.batch_size, self.device = batch_size, device

    @torch.no_grad()
    def pairs(self, references: list[str], candidates: list[str]) -> np.ndarray:
        """The score of each (reference, candidate) pair."""
        out = []
        for i in range(0, len(candidates), self.batch_size):
            batch = self.tokenizer(references[i:i + self.batch_size], candidates[i:i + self.batch_size],
                                   padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            logits = self.model(**batch.to(self.device)).logits
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def score(self, captions: list[str], references: list[list[str]]) -> dict[str, np.ndarray]:
        """Per-caption ``BLEURT``: the best score over the caption's references."""
        flat_refs = [r for refs in references for r in refs]
        flat_caps = [c for c, refs in zip(captions, references) for _ in refs]
        scores, out, start = self.pairs(flat_refs, flat_caps), np.zeros(len(captions)), 0
        for i, refs in enumerate(references):
            out[i], start = scores[start:start + len(refs)].max(), start + len(refs)
        return {"BLEURT": out}

