"""``make demo``: build the demo data, train the demo captioner with the LLM frozen, caption the test split
with the trained and the untrained model, score both against an image-blind baseline, and write
``outputs/demo/report.json``, ``outputs/demo/loss_curve.png`` and, through the evaluate recipe (trained against
the image-blind baseline), ``outputs/demo/report.html`` to browse the test images.

    python -m medcap.demo [--steps N] [--seed N] [--dtype auto|bf16|fp32] [--compile] [--out outputs/demo]
"""

import argparse
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

from medcap.cli import ROOT, run_recipe
from medcap.data.dataset import read_manifest
from medcap.data.demo_builder import build_demo
from medcap.data.demo_vqa import build_demo_vqa
from medcap.data.findings import findings_scores
from medcap.metrics import format_table, read_predictions, read_references, score, write_csv_predictions

DATA = ROOT / "datasets" / "demo"
COLUMNS = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "modality_acc", "finding_acc"]


def demo_scores(predictions: dict[str, str], references: dict[str, str]) -> dict[str, float]:
    """A row of the demo tables: the COCO metrics and the findings parsed from the captions."""
    return {**score(predictions, references), **findings_scores(predictions, references)}


def image_blind_predictions(train_manifest: Path, test_ids: list[str]) -> dict[str, str]:
    """The most frequent training caption, for every test image."""
    caption, _ = Counter(s["caption"] for s in read_manifest(train_manifest)).most_common(1)[0]
    return {i: caption for i in test_ids}


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86 AVX512-BF16 or AMX). The demo's frozen LLM then
    computes in bf16 (its training step 1.6x faster on a 2-core EPYC); elsewhere bf16 would be converted to fp32
    around every product and fp32 is the faster choice."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def training_overrides(out: Path, steps: int | None, seed: int | None, dtype: str | None = None,
                       compile: bool | None = None) -> list[str]:
    """The finetune_vision overrides of a demo run: its own folder, trained afresh every time."""
    return ([f"output_dir={out / 'train'}", "overwrite=true"] + ([f"max_steps={steps}"] if steps else [])
            + ([f"seed={seed}"] if seed is not None else []) + ([f"dtype={dtype}"] if dtype else [])
            + ([f"compile={str(compile).lower()}"] if compile is not None else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"))
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: the config's)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="the frozen LLM's dtype in training (the trained parts stay fp32); auto: bf16 where the "
                             "CPU has bf16 matrix instructions, else fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the LLM's layers for the training steps (default: the config's)")
    args = parser.parse_args()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bf16" if native_bf16() else "fp32"
        print(f"training dtype {dtype}: this CPU {'has' if dtype == 'bf16' else 'lacks'} bf16 matrix instructions")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    times = {}

    t0 = time.perf_counter()
    build_demo(DATA, seed=0)
    build_demo_vqa(DATA, split="test")  # the multiple-choice set of configs/demo/vqa.yaml
    times["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_recipe("finetune_vision", "demo/finetune_vision", training_overrides(out, args.steps, args.seed, dtype,
                                                                           args.compile))
    times["train"] = time.perf_counter() - t0

    runs = {"trained": f"checkpoint={out / 'train' / 'checkpoints'}", "untrained": "checkpoint=null"}
    for name, checkpoint in runs.items():
        t0 = time.perf_counter()
        run_recipe("generate", "demo/generate", [checkpoint, f"output_dir={out / name}"])
        times[f"generate_{name}"] = time.perf_counter() - t0

    references = {k: v[0] for k, v in read_references(DATA / "test.jsonl").items()}
    predictions = {name: read_predictions(out / name / "predictions.csv") for name in runs}
    predictions["image_blind"] = image_blind_predictions(DATA / "train.jsonl", list(references))
    write_csv_predictions(out / "image_blind" / "predictions.csv", predictions["image_blind"])

    t0 = time.perf_counter()
    report = {}
    for name, preds in predictions.items():
        report[name] = demo_scores(preds, references)
    times["score"] = time.perf_counter() - t0

    t0 = time.perf_counter()  # metrics.json, intervals, the paired comparison and report.html in ``out``
    run_recipe("evaluate", "demo/evaluate", [f"predictions={out / 'trained' / 'predictions.csv'}",
                                             f"compare_to={out / 'image_blind' / 'predictions.csv'}",
                                             f"references={DATA / 'test.jsonl'}", f"output_dir={out}"])
    times["report"] = time.perf_counter() - t0

    summary = json.loads((out / "train" / "train_summary.json").read_text())
    shutil.copyfile(out / "train" / "loss_curve.png", out / "loss_curve.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "timings.json").write_text(json.dumps({
        "seconds": times, "total_seconds": sum(times.values()),
        "train_mean_step_time_s": summary["mean_step_time_s"], "train_peak_memory_mb": summary["peak_memory_mb"],
    }, indent=2))

    print("\n" + format_table(report, COLUMNS))
    print(f"\nmodality_acc / finding_acc: share of test captions whose modality / finding type + location "
          f"match the reference. Wall time {sum(times.values()):.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}); training step "
          f"{summary['mean_step_time_s']:.2f} s, peak memory {summary['peak_memory_mb']:.0f} MB.")
    print(f"Report: {out / 'report.json'}; loss curve: {out / 'loss_curve.png'}")
    print(f"Browse the test images, captions and scores (trained vs image_blind): {out / 'report.html'}")
    for name in ("trained",):
        for sample_id in list(references)[:3]:
            print(f"  {sample_id}\n    reference: {references[sample_id]}\n    {name}: {predictions[name][sample_id]}")


if __name__ == "__main__":
    main()
