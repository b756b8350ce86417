"""MeGPT's clustering-based dynamic prompts. The seed says only that the prompt is chosen by clustering image
features; the design here is ours:

- Features: each training sample's images through a *separate, frozen* feature encoder (``feature_encoder``, by
  default the same builder and weights the model's encoder starts from), tokens averaged, views averaged,
  L2-normalised (``medcap.retrieval.ImageEmbedder``), in fp32. Not the trained model's encoder: its features
  drift as it trains, and a prompt must be picked the same way at training and at generation.
- k-means (faiss, ``num_clusters``, seeded, on every feature, the best of ``nredo`` starts) over those features;
  an image's prompt is its nearest centroid's.
- Each cluster's prompt is given in the config (``prompts``), or mined from the training reports of its members:
  a fixed vocabulary of findings terms (each term a list of phrases, matched as whole words, case-insensitive) is
  counted once per report where it is affirmed; an occurrence is negated, and not counted, when a negation cue
  ("no", "not", "without", "negative for", "free of", "clear of", "absence of", "resolved") comes before it in the
  same clause (a clause ends at . ; ? ! or "but"), or a resolution cue ("resolved", "no longer", "removed", not
  after "not", "partially", "incompletely", "nearly" or "almost", with at most one word between) comes after it in
  the same part of the clause (parts are separated by a comma, "and" or "with": in "cardiomegaly and the effusion
  has resolved" only the effusion is resolved). The ``top_k`` terms affirmed in at least ``min_share`` of the
  cluster's reports fill ``template``; a cluster with none gets ``empty``.
- Saved with every checkpoint (``prompt_clusters.safetensors``: centroids and the features of a fixed probe input;
  ``prompt_clusters.json``: prompts, the feature encoder's config, the mining counts), inside the checkpoint's
  atomically written folder, and reused by ``medcap run generate``, which checks the probe's features before it
  trusts the rebuilt feature encoder.
"""

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.numpy import load_file, save_file
from torchtune import utils

from medcap import distributed
from medcap.atomic import replaced_atomically

log = utils.get_logger("INFO")

WEIGHTS_FILE, META_FILE = "prompt_clusters.safetensors", "prompt_clusters.json"
NEGATION_CUES = ("no", "not", "without", "negative for", "free of", "clear of", "absence of", "resolved")
CLAUSE_END = re.compile(r"[.;?!]|\bbut\b")
# negate the finding named before them in their part of the clause (after the last comma, "and" or "with"); group 1
# is a qualifier, up to one word before the cue, that leaves it present ("has not resolved", "not yet resolved")
RESOLUTION_CUES = re.compile(r"\b(?:(not|partially|incompletely|nearly|almost)\s+(?:[a-z]+\s+)?)?"
                             r"(?:resolved|no\s+longer|removed)\b")
CLAUSE_PART = re.compile(r",|\band\b|\bwith\b")
FEATURES = ("mean of the feature encoder's tokens, then of a sample's images, L2-normalised, fp32; the feature "
            "encoder is built from feature_encoder and stays frozen (it is not the model's trained encoder)")
PROBE_TOLERANCE = 1e-3

# Chest X-ray findings (IU X-Ray / MIMIC reports): term -> phrases
CHEST_FINDINGS = {
    "cardiomegaly": ["cardiomegaly", "enlarged heart", "heart is enlarged", "heart size is enlarged"],
    "pleural effusion": ["effusion", "effusions"],
    "pneumothorax": ["pneumothorax"],
    "consolidation": ["consolidation", "consolidations"],
    "atelectasis": ["atelectasis", "atelectatic"],
    "opacity": ["opacity", "opacities", "opacification"],
    "edema": ["edema"],
    "pneumonia": ["pneumonia"],
    "nodule": ["nodule", "nodules", "nodular"],
    "mass": ["mass", "masses"],
    "granuloma": ["granuloma", "granulomas", "granulomatous"],
    "calcification": ["calcified", "calcification", "calcifications"],
    "emphysema": ["emphysema", "hyperinflated", "hyperinflation", "hyperexpanded"],
    "scoliosis": ["scoliosis"],
    "degenerative changes": ["degenerative"],
    "fracture": ["fracture", "fractures"],
    "hernia": ["hernia"],
    "tortuous aorta": ["tortuous", "tortuosity"],
    "surgical hardware": ["sternotomy", "surgical clips", "pacemaker", "catheter", "hardware"],
}


def _clauses(report: str) -> list[str]:
    text = " ".join(re.sub(r"[^a-z0-9.,;?!]+", " ", report.lower()).split())
    return [c.strip() for c in CLAUSE_END.split(text) if c.strip()]


def _phrase_pattern(phrase: str) -> re.Pattern:
    return re.compile(r"\b" + r"\s+".join(map(re.escape, phrase.lower().split())) + r"\b")


def affirmed_terms(report: str, vocabulary: dict[str, list[str]]) -> set[str]:
    """The vocabulary terms a report affirms: one of its phrases occurs in a clause with no negation cue
    before it and no resolution cue after it."""
    cues = [_phrase_pattern(c) for c in NEGATION_CUES]
    found = set()
    for clause in _clauses(report):
        negated_from = min((m.start() for c in cues for m in [c.search(clause)] if m), default=len(clause) + 1)
        resolved = [(max((b.end() for b in CLAUSE_PART.finditer(clause, 0, m.start())), default=0), m.start())
                    for m in RESOLUTION_CUES.finditer(clause) if not m.group(1)]  # spans reported resolved
        for term, phrases in vocabulary.items():
            for phrase in phrases:
                if any(m.start() < negated_from and not any(a <= m.start() < b for a, b in resolved)
                       for m in _phrase_pattern(phrase).finditer(clause)):
                    found.add(term)
    return found


def normalise_vocabulary(vocabulary: Any) -> dict[str, list[str]]:
    """A mapping term -> phrase(s), or a list of terms (each its own phrase); None: ``CHEST_FINDINGS``."""
    if vocabulary is None:
        return dict(CHEST_FINDINGS)
    if isinstance(vocabulary, (DictConfig, ListConfig)):
        vocabulary = OmegaConf.to_container(vocabulary, resolve=True)
    if isinstance(vocabulary, dict):
        return {str(k): [v] if isinstance(v, str) else [str(p) for p in v] for k, v in vocabulary.items()}
    return {str(t): [str(t)] for t in vocabulary}


def mine_prompts(reports: list[str], labels: np.ndarray, num_clusters: int, vocabulary: dict[str, list[str]],
                 template: str, empty: str, top_k: int = 3, min_share: float = 0.1
                 ) -> tuple[list[str], list[dict[str, Any]]]:
    """One prompt per cluster from its members' reports (see the module doc), and per cluster its size and how
    many of its reports affirm each term."""
    counts = [Counter() for _ in range(num_clusters)]
    sizes = Counter(int(c) for c in labels)
    for report, cluster in zip(reports, labels):
        counts[int(cluster)].update(affirmed_terms(report or "", vocabulary))
    order = {term: i for i, term in enumerate(vocabulary)}
    prompts, stats = [], []
    for c in range(num_clusters):
        size = max(sizes[c], 1)
        ranked = sorted((t for t, n in counts[c].items() if n / size >= min_share),
                        key=lambda t: (-counts[c][t], order[t]))
        chosen = ranked[:top_k]
        prompts.append(template.format(findings=", ".join(chosen)) if chosen else empty)
        stats.append({"size": sizes[c], "affirmed": dict(counts[c].most_common()), "findings": chosen})
    return prompts, stats


def probe_input(image_size: int) -> torch.Tensor:
    """A fixed input (seeded noise) whose features fingerprint the feature encoder."""
    return torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


class PromptClusters:
    def __init__(self, centroids: np.ndarray, prompts: list[str], probe: np.ndarray, meta: dict[str, Any]):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if len(prompts) != len(centroids):
            raise ValueError(f"{len(centroids)} clusters but {len(prompts)} prompts: give one prompt per cluster")
        self.centroids, self.prompts, self.meta = centroids, [str(p) for p in prompts], dict(meta)
        self.probe = np.asarray(probe, dtype=np.float32)
        self.index = faiss.IndexFlatL2(centroids.shape[1])
        self.index.add(centroids)

    def __len__(self) -> int:
        return len(self.prompts)

    def assign(self, features: np.ndarray) -> np.ndarray:
        """The nearest centroid (L2, as k-means assigns) of each row of ``features``."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"features of shape {features.shape} for centroids of dimension {self.centroids.shape[1]}")
        return self.index.search(features, 1)[1][:, 0]

    def apply(self, dataset, embedder, batch_size: int = 32) -> np.ndarray:
        """Give each sample of a CaptionDataset the prompt of its images' cluster; returns the clusters."""
        self.check_embedder(embedder)
        labels = self.assign(embedder.embed_samples(dataset.samples, batch_size, desc=f"cluster {dataset.name}"))
        self.set_prompts(dataset, labels)
        return labels

    def set_prompts(self, dataset, labels: np.ndarray) -> None:
        """Give each sample of a CaptionDataset the prompt of its cluster (``labels``, one per sample)."""
        own = sum(1 for s in dataset.samples if s.get("prompt"))
        if own:
            log.warning(f"{dataset.name}: {own} samples carry their own prompt; dynamic prompts replace them")
        for sample, cluster in zip(dataset.samples, labels):
            sample["prompt"], sample["cluster"] = self.prompts[int(cluster)], int(cluster)
        log.info(f"{dataset.name}: prompts from {len(self)} clusters, sizes "
                 f"{dict(sorted(Counter(int(c) for c in labels).items()))}")

    def check_embedder(self, embedder) -> None:
        got = embedder.embed_images([probe_input(embedder.encoder.image_size)])[0]
        if got.shape != self.probe.shape or not np.allclose(got, self.probe, atol=PROBE_TOLERANCE):
            raise ValueError(f"the feature encoder {self.meta.get('source', {}).get('encoder')} does not give the "
                             f"features the clustering was made with (probe input differs): check its weights")

    # -- disk

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        with replaced_atomically(folder / WEIGHTS_FILE) as tmp:
            save_file({"centroids": self.centroids, "probe": self.probe}, str(tmp))
        with replaced_atomically(folder / META_FILE) as tmp:
            tmp.write_text(json.dumps({**self.meta, "prompts": self.prompts}, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> "PromptClusters | None":
        """The clustering saved in ``folder`` (a checkpoint), or None if it holds none."""
        folder = Path(folder)
        if not (folder / META_FILE).is_file():
            return None
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            tensors = load_file(str(folder / WEIGHTS_FILE))
            prompts = meta.pop("prompts")
            return cls(tensors["centroids"], prompts, tensors["probe"], meta)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{folder}: cannot read the prompt clustering ({META_FILE}, {WEIGHTS_FILE}): "
                             f"{error}") from None

    def embedder(self, device: torch.device, trusted: list[str] | tuple = (), read_from: str | Path | None = None):
        """The frozen feature encoder this clustering was made with, rebuilt from its recorded config (whose
        components must be medcap's builders or ``trusted``)."""
        from medcap.retrieval import embedder_from_source

        return embedder_from_source(self.meta["source"], device, torch.float32, read_from=read_from,
                                    trusted=trusted)


def feature_embedder(node: DictConfig, device: torch.device, seed: int):
    """The frozen feature encoder a ``dynamic_prompts`` config node names (``feature_encoder``), in fp32."""
    from medcap.retrieval import embedder_from_source, retrieval_source

    if not node.get("feature_encoder"):
        raise ValueError("dynamic_prompts.feature_encoder: name the frozen encoder whose features are clustered "
                         "(e.g. the model's encoder builder with its starting weights)")
    return embedder_from_source(retrieval_source(encoder_node=node.feature_encoder, seed=seed), device, torch.float32)


def fit_prompt_clusters(node: DictConfig, dataset, embedder, base_prompt: str,
                        seed: int) -> tuple["PromptClusters", np.ndarray]:
    """k-means over the training set's features and one prompt per cluster (``node``: the config's
    ``dynamic_prompts``: num_clusters, niter, nredo, prompts or vocabulary / template / empty / top_k / min_share), and
    each training sample's cluster."""
    k = int(node.get("num_clusters", 8))
    features = embedder.embed_samples(dataset.samples, node.get("batch_size", 32), desc="cluster features")
    if k < 1 or k > len(features):
        raise ValueError(f"dynamic_prompts.num_clusters={k}: needs 1 .. {len(features)} (the training samples)")
    # every feature trains (faiss would sample 256 per centroid), best of nredo seeded starts by inertia
    kmeans = faiss.Kmeans(features.shape[1], k, niter=int(node.get("niter", 25)), nredo=int(node.get("nredo", 5)),
                          seed=seed, verbose=False, min_points_per_centroid=1, max_points_per_centroid=len(features))
    kmeans.train(features)
    clusters = PromptClusters(kmeans.centroids, [""] * k, np.zeros(0), {})
    labels = clusters.assign(features)
    vocabulary = normalise_vocabulary(node.get("vocabulary"))
    template = node.get("template") or (base_prompt + " Findings often seen in similar images: {findings}.")
    empty = node.get("empty") or (base_prompt + " Similar images were mostly normal.")
    mined, stats = mine_prompts([s.get("caption") or "" for s in dataset.samples], labels, k, vocabulary,
                                template, empty, int(node.get("top_k", 3)), float(node.get("min_share", 0.1)))
    given = node.get("prompts")
    prompts = list(given) if given else mined
    probe = embedder.embed_images([probe_input(embedder.encoder.image_size)])[0]
    meta = {"source": embedder.source, "features": FEATURES, "num_clusters": k, "seed": seed,
            "prompts_from": "config" if given else "mined from the training reports", "vocabulary": vocabulary,
            "negation_cues": list(NEGATION_CUES), "clusters": stats, "trained_on": dataset.name}
    result = PromptClusters(kmeans.centroids, prompts, probe, meta)
    for c, (prompt, stat) in enumerate(zip(prompts, stats)):
        log.info(f"cluster {c} ({stat['size']} samples): {prompt}")
    return result, labels


def for_training(cfg: DictConfig, train_set, resume: str | Path | None, device: torch.device):
    """The run's clustering (the resumed checkpoint's, else fitted on ``train_set``), applied to ``train_set``,
    and the feature embedder (for the validation sets)."""
    from medcap.checkpoint import resolve_checkpoint

    node = cfg.dynamic_prompts
    embedder = feature_embedder(node, device, cfg.seed)
    clusters = PromptClusters.load(resolve_checkpoint(resume)) if resume else None
    if clusters is not None:
        clusters.apply(train_set, embedder)
        return clusters, embedder
    # fitted on rank 0 only, so every rank of a torchrun job uses the same clustering; the training samples'
    # clusters come with it (their features are not computed twice)
    fitted, labels = (fit_prompt_clusters(node, train_set, embedder, train_set.prompt, cfg.seed)
                      if distributed.is_rank_zero() else (None, None))
    parts = distributed.broadcast_object(
        None if fitted is None else (fitted.centroids, fitted.prompts, fitted.probe, fitted.meta, labels))
    clusters = PromptClusters(*parts[:4])
    clusters.set_prompts(train_set, parts[4])
    return clusters, embedder


def for_generation(cfg: DictConfig, dataset, device: torch.device) -> PromptClusters | None:
    """Apply the clustering saved with ``cfg.checkpoint`` (if it has one) to ``dataset``; a config that asks for
    ``dynamic_prompts`` with a checkpoint without a clustering is an error. Its frozen feature encoder is
    ``cfg.feature_encoder`` when set (the generate config's own paths: the weights may have moved since training),
    else rebuilt as the clustering recorded it; either way its features must be the recorded ones (the probe)."""
    from medcap.checkpoint import resolve_checkpoint

    checkpoint = cfg.get("checkpoint")
    folder = resolve_checkpoint(checkpoint) if checkpoint and Path(checkpoint).is_dir() else None
    clusters = PromptClusters.load(folder) if folder else None
    if clusters is None:
        if cfg.get("dynamic_prompts"):
            raise ValueError(f"dynamic_prompts is set but checkpoint={checkpoint} holds no {META_FILE}: generate "
                             f"from a checkpoint of a run trained with dynamic prompts")
        return None
    # `feature_encoder=null` on the command line nulls its _component_ (torchtune's override rule)
    if cfg.get("feature_encoder") and cfg.feature_encoder.get("_component_"):
        embedder = feature_embedder(cfg, device, cfg.get("seed", 0))
    else:
        embedder = clusters.embedder(device, trusted=list(cfg.get("trusted_components") or []),
                                     read_from=folder / META_FILE)
    clusters.apply(dataset, embedder, cfg.get("batch_size", 32))
    return clusters
