"""Caption and VQA metrics. ``score(predictions, references, preset)`` -> {metric: value};
``evaluate(...)`` also keeps per-sample scores for ``per_sample.csv`` and bootstrap intervals."""

from medcap.metrics.bootstrap import bootstrap_ci, paired_bootstrap
from medcap.metrics.coco import COCO_METRICS, coco_scores
from medcap.metrics.imageclef import imageclef_scores, preprocess_caption
from medcap.metrics.io import read_predictions, read_references, write_csv_predictions
from medcap.metrics.result import Scored
from medcap.metrics.submission import check_submission

PRESETS = ("coco", "imageclef", "vqa")
IMAGECLEF_METRICS = ["BERTScore", "ROUGE-1", "ROUGE-L", "BLEU-1"]


def _check_ids(predictions: dict, references: dict, source: str | None = None) -> None:
    where = f"{source}: " if source else ""
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"{where}{len(missing)} reference id(s) have no prediction, e.g. {missing[:5]}")
    if extra:
        raise ValueError(f"{where}{len(extra)} prediction id(s) are not in the references, e.g. {extra[:5]}")
    if not references:
        raise ValueError("no references to score")


def _bertscore(option):
    from medcap.metrics.bertscore import BertScore

    if option is None or option is True:
        return BertScore()
    if isinstance(option, dict):
        return BertScore(**option)
    return option  # a BertScore instance, or False to skip


def evaluate(predictions: dict[str, str], references: dict[str, str | list[str]], preset: str = "coco",
             tokenize: bool = True, bertscore=None, meteor: bool = True, clipscore=None,
             images: dict[str, str] | None = None, group_by: str | None = "modality", bleurt=None,
             source: str | None = None) -> Scored:
    """Score ``predictions`` ({id: caption}) against ``references`` ({id: caption or [captions]}); every reference
    id needs a prediction and every prediction a reference.

    ``preset="coco"``: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) after PTB tokenisation, or only
    lowercasing and whitespace splitting with ``tokenize=False`` (pre-tokenised text, as R2Gen scores).
    ``preset="imageclef"``: the official preprocessing, then BERTScore, ROUGE-1, ROUGE-L and BLEU-1 averaged over
    images.
    ``bertscore``: None or True for the default (MiniLM, F1), False to skip, a dict of ``BertScore`` arguments
    (``model``, ``num_layers``, ``idf``, ``component``) or a ``BertScore``.
    ``preset="vqa"``: ``references`` are questions ({id: {"answer", "options", "modality", ...}}, see
    ``medcap.metrics.vqa.read_vqa_references``); accuracy, macro accuracy over ``group_by`` and per group.
    ``clipscore``: a ``ClipScore`` or a dict of its arguments (``model``: a local open_clip folder), with
    ``images`` ({id: image path}), adds CLIPScore and RefCLIPScore to either preset.
    ``bleurt``: a ``Bleurt`` or a dict of its arguments (``model``: a local BLEURT folder in the BERT layout) adds
    BLEURT (mean over images of each caption's best score over its references, on the raw captions).
    ``source``: the predictions file, named by the errors about ids."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    if preset == "vqa":
        from medcap.metrics.vqa import vqa_scored

        _check_ids(predictions, references, source)
        return vqa_scored(references, predictions, group_by)
    refs = {k: [v] if isinstance(v, str) else list(v) for k, v in references.items()}
    _check_ids(predictions, refs, source)
    if preset == "coco":
        scored = coco_scores(predictions, refs, ptb=tokenize, meteor=meteor)
    else:
        scored = _imageclef(predictions, refs, bertscore)
    if clipscore:
        scored = scored.merge(_clip_scored(predictions, refs, clipscore, images, scored.ids))
    if bleurt:
        from medcap.metrics.bleurt import Bleurt
        from medcap.metrics.result import mean_scored

        scorer = Bleurt(**bleurt) if isinstance(bleurt, dict) else bleurt
        ids = scored.ids
        scored = scored.merge(mean_scored(ids, scorer.score([predictions[k] for k in ids], [refs[k] for k in ids])))
    return scored


def _clip_scored(predictions, refs, clipscore, images, ids) -> Scored:
    from medcap.metrics.clipscore import ClipScore
    from medcap.metrics.result import mean_scored

    missing = [k for k in ids if not (images or {}).get(k)]
    if missing:
        raise ValueError(f"CLIPScore needs each sample's image: {len(missing)} id(s) have none, e.g. {missing[:5]} "
                         f"(give the references as a manifest with an image column)")
    scorer = ClipScore(**clipscore) if isinstance(clipscore, dict) else clipscore
    per_sample = scorer.score([predictions[k] for k in ids], [images[k] for k in ids], [refs[k] for k in ids])
    return mean_scored(ids, per_sample)


def _imageclef(predictions, refs, bertscore) -> Scored:
    several = [k for k, v in refs.items() if len(v) != 1]
    if several:
        raise ValueError(f"the imageclef preset takes one reference caption per id; {len(several)} id(s) have "
                         f"another number, e.g. {several[0]!r} with {len(refs[several[0]])}")
    scorer = _bertscore(bertscore) if bertscore is not False else None
    return imageclef_scores(predictions, {k: v[0] for k, v in refs.items()}, scorer)


def score(predictions: dict[str, str], references: dict[str, str | list[str]], preset: str = "coco",
          **options) -> dict[str, float]:
    """Corpus scores {metric: value}; see ``evaluate`` for the presets and options."""
    return evaluate(predictions, references, preset, **options).corpus


def format_table(rows: dict[str, dict[str, float]], metrics: list[str] | None = None,
                 intervals: dict[str, dict[str, tuple[float, float]]] | None = None) -> str:
    """A fixed-width text table: one row per run, one column per metric (4 decimals, ``-`` if missing), and
    under a row its confidence intervals when ``intervals`` has them."""
    if metrics is None:
        metrics = list(dict.fromkeys(m for values in rows.values() for m in values))
    table = []  # (row label, a cell per metric)
    for name, values in rows.items():
        table.append((name, [f"{values[m]:.4f}" if m in values else "-" for m in metrics]))
        ci = (intervals or {}).get(name)
        if ci:
            table.append(("  95% CI", [f"[{ci[m][0]:.4f},{ci[m][1]:.4f}]" if m in ci else "" for m in metrics]))
    width = max([len(label) for label, _ in table] + [3]) + 2
    cols = [max([len(m), 8] + [len(cells[j]) for _, cells in table]) + 2 for j, m in enumerate(metrics)]
    lines = ["".ljust(width) + "".join(m.rjust(c) for m, c in zip(metrics, cols))]
    lines += [label.ljust(width) + "".join(cell.rjust(c) for cell, c in zip(cells, cols)) for label, cells in table]
    return "\n".join(lines)


__all__ = ["COCO_METRICS", "IMAGECLEF_METRICS", "PRESETS", "Scored", "bootstrap_ci", "check_submission", "evaluate",
           "format_table", "paired_bootstrap", "preprocess_caption", "read_predictions", "read_references", "score",
           "write_csv_predictions"]
