"""Caption metrics: ``score(predictions, references, preset)`` and prediction/reference file I/O."""

from medcap.metrics.coco import COCO_METRICS, coco_scores
from medcap.metrics.io import read_predictions, read_references, write_csv_predictions

PRESETS = ("coco",)


def score(predictions: dict[str, str], references: dict[str, str | list[str]], preset: str = "coco",
          tokenize: bool = True) -> dict[str, float]:
    """Corpus scores of ``predictions`` ({id: caption}) against ``references`` ({id: caption or [captions]}).
    Every reference id needs a prediction and every prediction a reference. ``preset="coco"``: BLEU-1..4,
    METEOR, ROUGE-L, CIDEr (pycocoevalcap), after PTB tokenisation unless ``tokenize=False``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    refs = {k: [v] if isinstance(v, str) else list(v) for k, v in references.items()}
    missing = [k for k in refs if k not in predictions]
    extra = [k for k in predictions if k not in refs]
    if missing:
        raise ValueError(f"{len(missing)} reference id(s) have no prediction, e.g. {missing[:5]}")
    if extra:
        raise ValueError(f"{len(extra)} prediction id(s) are not in the references, e.g. {extra[:5]}")
    if not refs:
        raise ValueError("no references to score")
    return coco_scores(predictions, refs, ptb=tokenize)


def format_table(rows: dict[str, dict[str, float]], metrics: list[str] | None = None) -> str:
    """A fixed-width text table: one row per run, one column per metric (4 decimals, ``-`` if missing)."""
    metrics = metrics or COCO_METRICS
    width = max([len(name) for name in rows] + [3]) + 2
    cols = [max(len(m), 6) + 2 for m in metrics]
    lines = ["".ljust(width) + "".join(m.rjust(c) for m, c in zip(metrics, cols))]
    for name, values in rows.items():
        cells = [(f"{values[m]:.4f}" if m in values else "-").rjust(c) for m, c in zip(metrics, cols)]
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


__all__ = ["COCO_METRICS", "PRESETS", "format_table", "read_predictions", "read_references", "score",
           "write_csv_predictions"]
