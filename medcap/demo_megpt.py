"""``make demo-megpt``: MeGPT's ablation on the embedded demo. Each row trains configs/demo/megpt.yaml with the same
budget (steps, seed, data, learning rates) and one set of modules on, generates the test captions with
configs/demo/megpt_generate.yaml and scores them (COCO metrics + the demo's modality / finding accuracy); one table
is printed and written to ``OUT/ablation.md`` (figures in ``OUT/ablation.json``).

    python -m medcap.demo_megpt [--steps N] [--max-new-tokens N] [--rows base,fem,...] [--out outputs/demo_megpt]
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from medcap.cli import ROOT, run_recipe
from medcap.data.demo_builder import build_demo
from medcap.demo import COLUMNS, DATA, demo_scores, image_blind_predictions
from medcap.metrics import format_table, read_predictions, read_references

OFF = {"fem": "model.fem=null", "prompt": "dynamic_prompts=null", "l2": "l2_lambda=0"}
ROWS = {  # row -> the modules it keeps on
    "base": set(),
    "fem": {"fem"},
    "prompt": {"prompt"},
    "l2": {"l2"},
    "full": {"fem", "prompt", "l2"},
}


def row_overrides(modules: set[str]) -> list[str]:
    return [off for module, off in OFF.items() if module not in modules]


def markdown_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    lines = ["| row | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.4f}" if c in values else "-" for c in columns) + " |")
    return "\n".join(lines)


def train_and_generate(out: Path, row: str, overrides: list[str], steps: int, max_new_tokens: int,
                       test_manifest: Path) -> None:
    run_recipe("finetune", "demo/megpt", [f"output_dir={out / row / 'train'}", "overwrite=true",
                                          f"max_steps={steps}", f"eval_every={steps}", f"save_every={steps}",
                                          *overrides])
    run_recipe("generate", "demo/megpt_generate", [f"checkpoint={out / row / 'train' / 'checkpoints'}",
                                                   f"output_dir={out / row / 'generate'}",
                                                   f"dataset.manifest={test_manifest}",
                                                   f"max_new_tokens={max_new_tokens}",
                                                   *[o for o in overrides if o.startswith("model.")]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps of every row (default 40)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="generation length (demo captions: ~15)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
    parser.add_argument("--test-limit", type=int, default=48,
                        help="score the first N test images (default 48: 6 per base image; 0: all 96)")
    parser.add_argument("--keep", action="store_true",
                        help="keep OUT and skip rows whose predictions are there (a run cut short goes on)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo_megpt"))
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    out = Path(args.out)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    build_demo(DATA, seed=0)
    test_manifest = DATA / "test.jsonl"
    if args.test_limit:  # written beside test.jsonl: its relative image paths resolve the same way
        lines = test_manifest.read_text(encoding="utf-8").splitlines()[:args.test_limit]
        test_manifest = DATA / f"test_first{args.test_limit}.jsonl"
        test_manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    references = {k: v[0] for k, v in read_references(test_manifest).items()}

    table, figures = {}, {}
    for row in rows:
        overrides = row_overrides(ROWS[row])
        predictions_csv = out / row / "generate" / "predictions.csv"
        t0 = time.perf_counter()
        if args.keep and predictions_csv.is_file():
            print(f"{row}: kept from an earlier run ({predictions_csv})")
        else:
            train_and_generate(out, row, overrides, args.steps, args.max_new_tokens, test_manifest)
        row_s = time.perf_counter() - t0  # training and generation
        predictions = read_predictions(predictions_csv)
        table[row] = demo_scores({k: predictions.get(k, "") for k in references}, references)
        summary = json.loads((out / row / "train" / "train_summary.json").read_text())
        last = summary["history"][-1]
        figures[row] = {**table[row], "overrides": overrides, "seconds": row_s,
                        "final_caption_loss": last["loss"], "final_reg_loss": last.get("reg_loss"),
                        "val_loss": last.get("val_loss")}
        table[row]["val_loss"] = last.get("val_loss", float("nan"))
    table["image_blind"] = demo_scores(image_blind_predictions(DATA / "train.jsonl", list(references)), references)

    columns = COLUMNS + ["val_loss"]
    text = format_table(table, columns)
    print("\n" + text)
    note = (f"{args.steps} steps per row (batch 4, seed 0, greedy decoding up to {args.max_new_tokens} tokens), "
            f"SmolLM2-135M frozen, EfficientNet-Lite0 + projector (+ FEM) trained; the first {len(references)} test "
            f"images; image_blind: the most frequent training caption for every image.")
    print(note)
    (out / "ablation.md").write_text(markdown_table(table, columns) + "\n\n" + note + "\n")
    (out / "ablation.json").write_text(json.dumps(figures, indent=2))
    print(f"table: {out / 'ablation.md'}; figures: {out / 'ablation.json'}")


if __name__ == "__main__":
    main()
