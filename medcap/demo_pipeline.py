"""``make demo-pipeline``: the AUEB generation pipeline on the demo data, every stage scored in one table.

Starting from the captioner ``make demo`` trained (``outputs/demo/train/checkpoints``; trained here first if
missing), it builds a retrieval index with the trained encoder and runs, on the test split:

- ``trained``: the captioner, greedy;
- ``nearest_caption``: the caption of the nearest training image;
- ``knn_fewshot``: the captioner with k = 3 retrieved image-caption pairs as earlier chat turns;
- ``synthesizer``: SmolLM2 (text only) rewriting the greedy captions with the neighbours' captions;
- ``fuser_untrained`` / ``fuser``: SmolLM2 merging three runs' captions (greedy, sampled at T = 0.7, the
  step-120 checkpoint), zero-shot and after training on the validation split's candidates.

Writes ``outputs/demo_pipeline/report.json`` ({row: {metric: value}}) and prints the table.

    python -m medcap.demo_pipeline [--out outputs/demo_pipeline]
"""

import argparse
import json
import time
from pathlib import Path

from medcap.cli import ROOT, run_recipe
from medcap.data.demo_builder import build_demo
from medcap.data.demo_vqa import build_demo_vqa
from medcap.demo import COLUMNS, DATA, demo_scores
from medcap.metrics import format_table, read_predictions, read_references

TRAIN = ROOT / "outputs" / "demo" / "train"
CANDIDATES = {  # name -> generate overrides; the fuser reads the captions in this order
    "greedy": [f"checkpoint={TRAIN / 'checkpoints'}"],
    "sample07": [f"checkpoint={TRAIN / 'checkpoints'}", "temperature=0.7", "top_p=0.9", "seed=7"],
    "step120": [f"checkpoint={TRAIN / 'checkpoints' / 'step_000120'}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo_pipeline"))
    args = parser.parse_args()
    out = Path(args.out)
    times: dict[str, float] = {}

    def stage(name: str, recipe: str, config: str, overrides: list[str]) -> None:
        t0 = time.perf_counter()
        run_recipe(recipe, config, overrides)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    build_demo(DATA, seed=0)
    build_demo_vqa(DATA, split="test")
    if not (TRAIN / "checkpoints" / "step_000120").is_dir():
        stage("train", "finetune_vision", "demo/finetune_vision", [f"output_dir={TRAIN}", "overwrite=true"])

    index = out / "index"
    stage("build_index", "build_index", "demo/build_index",
          [f"checkpoint={TRAIN / 'checkpoints'}", f"output_dir={index}"])
    for name, overrides in CANDIDATES.items():
        for split in ("val", "test"):
            stage(f"generate_{split}", "generate", "demo/generate",
                  overrides + [f"dataset.manifest={DATA / f'{split}.jsonl'}",
                               f"output_dir={out / 'candidates' / name / split}"])
    test_runs = [str(out / "candidates" / name / "test" / "predictions.csv") for name in CANDIDATES]
    val_runs = [str(out / "candidates" / name / "val" / "predictions.csv") for name in CANDIDATES]

    stage("nearest_caption", "nearest_caption", "demo/nearest_caption",
          [f"index_dir={index}", f"output_dir={out / 'nearest_caption'}"])
    stage("knn_fewshot", "knn_fewshot", "demo/knn_fewshot",
          [f"checkpoint={TRAIN / 'checkpoints'}", f"index_dir={index}", f"output_dir={out / 'knn_fewshot'}"])
    stage("synthesize", "synthesize", "demo/synthesize",
          [f"drafts={test_runs[0]}", f"index_dir={index}", f"output_dir={out / 'synthesize'}"])
    stage("fuse_untrained", "fuse", "demo/fuse",
          ["checkpoint=null", f"candidates=[{','.join(test_runs)}]", f"output_dir={out / 'fuse_untrained'}"])
    stage("train_fuser", "train_fuser", "demo/train_fuser",
          [f"candidates=[{','.join(val_runs)}]", f"output_dir={out / 'fuser'}", "overwrite=true"])
    stage("fuse", "fuse", "demo/fuse",
          [f"checkpoint={out / 'fuser' / 'checkpoints'}", f"candidates=[{','.join(test_runs)}]",
           f"output_dir={out / 'fuse'}"])

    references = {k: v[0] for k, v in read_references(DATA / "test.jsonl").items()}
    rows = {"trained": test_runs[0], "nearest_caption": out / "nearest_caption" / "predictions.csv",
            "knn_fewshot": out / "knn_fewshot" / "predictions.csv",
            "synthesizer": out / "synthesize" / "predictions.csv",
            "fuser_untrained": out / "fuse_untrained" / "predictions.csv", "fuser": out / "fuse" / "predictions.csv"}
    report = {}
    for name, path in rows.items():
        predictions = read_predictions(path)
        missing = set(references) - set(predictions)
        if missing:
            raise RuntimeError(f"{path}: {len(missing)} test IDs have no caption, e.g. {sorted(missing)[:3]}")
        report[name] = demo_scores(predictions, references)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "timings.json").write_text(json.dumps({"seconds": times, "total_seconds": sum(times.values())}, indent=2))

    print("\n" + format_table(report, COLUMNS))
    print(f"\nWall time {sum(times.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}).")
    print(f"Report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
