"""Score a predictions CSV (``ID,caption``) against references (a CSV or a JSONL manifest): BLEU-1..4,
METEOR, ROUGE-L, CIDEr via pycocoevalcap. Writes ``output_dir/metrics.json`` and prints a table.

    medcap run evaluate --config demo/evaluate predictions=P.csv references=R.jsonl
"""

import json
import sys
from pathlib import Path

from omegaconf import DictConfig
from torchtune import config

from medcap.metrics import format_table, read_predictions, read_references, score


@config.parse
def main(cfg: DictConfig) -> None:
    predictions = read_predictions(cfg.predictions)
    references = read_references(cfg.references)
    metrics = score(predictions, references, preset=cfg.get("preset", "coco"), tokenize=cfg.get("tokenize", True))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_table({Path(cfg.predictions).parent.name or "predictions": metrics}))
    print(f"{len(references)} images scored -> {out / 'metrics.json'}")


if __name__ == "__main__":
    sys.exit(main())
