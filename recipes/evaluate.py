"""Score a predictions CSV (``ID,caption``) against references (a CSV or a JSONL manifest) with a preset:
``coco`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr via pycocoevalcap; ``tokenize=false`` for R2Gen's pre-tokenised
text), ``imageclef`` (official preprocessing; BERTScore, ROUGE-1, ROUGE-L, BLEU-1) or ``vqa`` (answers against
questions with options or closed answers: accuracy, macro accuracy over modalities); CLIPScore and RefCLIPScore when
``clipscore.model`` names a local open_clip folder, BLEURT when ``bleurt.model`` names a local BLEURT
folder. Writes ``metrics.json``,
``per_sample.csv`` and, with ``bootstrap`` > 0, ``intervals.json``; with ``compare_to`` (a second predictions
CSV) a paired bootstrap of the difference goes to ``paired.json``; ``report.html`` (unless ``report=false``) is a
page to browse the samples (``medcap.report``). Prints a table.

    medcap run evaluate --config eval/coco predictions=P.csv references=R.jsonl
"""

import csv
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medcap.atomic import remove_earlier, replaced_atomically, write_json
from medcap.metrics import (bootstrap_ci, check_submission, evaluate, format_table, paired_bootstrap,
                            read_predictions, read_references)
from medcap.metrics.bootstrap import p_text
from medcap.metrics.compare import run_names
from medcap.report import evaluation_report, report_options, scoring_outputs
from medcap.command import run_command


@config.parse
def main(cfg: DictConfig) -> None:
    preset = cfg.get("preset", "coco")
    report = report_options(cfg.get("report", True))  # checked before anything is scored
    resamples, seed = int(cfg.get("bootstrap", 0)), int(cfg.get("seed", 0))
    if resamples < 0 or seed < 0:
        raise ValueError(f"bootstrap and seed must be at least 0, got bootstrap={resamples}, seed={seed}")
    if preset == "vqa":
        from medcap.metrics.vqa import read_vqa_references

        references = read_vqa_references(cfg.references)
    else:
        references = read_references(cfg.references)
    if cfg.get("check_submission", True):  # every preset: a malformed file must not be scored
        for predictions in filter(None, (cfg.predictions, cfg.get("compare_to"))):
            problems = check_submission(predictions, references)
            if problems:
                print("\n".join(problems), file=sys.stderr)
                raise SystemExit(f"evaluate: {predictions} is not a valid submission ({len(problems)} problem(s))")
    bertscore = cfg.get("bertscore")
    options = dict(preset=preset, tokenize=cfg.get("tokenize", True), group_by=cfg.get("group_by", "modality"),
                   meteor=cfg.get("meteor", True),
                   bertscore=OmegaConf.to_container(bertscore) if isinstance(bertscore, DictConfig) else bertscore)
    if options["preset"] == "imageclef" and isinstance(options["bertscore"], dict):
        from medcap.metrics.bertscore import BertScore  # load the model once for both prediction files

        options["bertscore"] = BertScore(**options["bertscore"])
    clip = cfg.get("clipscore")
    if preset == "vqa":
        pass
    elif clip and clip.get("model"):
        from medcap.data.dataset import read_manifest
        from medcap.metrics.clipscore import ClipScore

        options["images"] = {row["id"]: row["images"][0] for row in read_manifest(cfg.references)}
        options["clipscore"] = ClipScore(**OmegaConf.to_container(clip))
    else:
        print("CLIPScore: skipped (set clipscore.model to a local open_clip folder and give a manifest as references)")
    bleurt = cfg.get("bleurt")
    if preset != "vqa" and bleurt and bleurt.get("model"):
        from medcap.metrics.bleurt import Bleurt

        options["bleurt"] = Bleurt(**OmegaConf.to_container(bleurt))
    elif preset != "vqa":
        print("BLEURT: skipped (set bleurt.model to a local BLEURT folder in the BERT layout)")
    scored = evaluate(read_predictions(cfg.predictions, header_optional=True), references, **options,
                      source=cfg.predictions)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in remove_earlier(scoring_outputs(out)):
        print(f"removed the earlier scoring's {path}")
    write_json(out / "metrics.json", scored.corpus)
    with replaced_atomically(out / "per_sample.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", *scored.per_sample])
        for i, sample_id in enumerate(scored.ids):
            writer.writerow([sample_id, *(f"{v[i]:.6f}" for v in scored.per_sample.values())])

    # each system named by its folder, by more of its path where two share one
    name, other_name = run_names([cfg.predictions, cfg.compare_to]) if cfg.get("compare_to") else \
        (run_names([cfg.predictions])[0], None)
    rows, intervals = {name: scored.corpus}, {}
    if resamples:
        intervals[name] = bootstrap_ci(scored, resamples, seed)
        write_json(out / "intervals.json", {"level": 0.95, "resamples": resamples, "seed": seed,
                                             "intervals": intervals[name]})
    if cfg.get("compare_to"):
        other = evaluate(read_predictions(cfg.compare_to, header_optional=True), references, **options,
                         source=cfg.compare_to)
        rows[other_name] = other.corpus
        paired_resamples = resamples or 1000  # bootstrap=0 sets no intervals; the comparison still needs resamples
        paired = {"a": str(cfg.predictions), "b": str(cfg.compare_to), "level": 0.95, "resamples": paired_resamples,
                  "seed": seed, "metrics": paired_bootstrap(scored, other, paired_resamples, seed)}
        write_json(out / "paired.json", paired)
    print(format_table(rows, intervals=intervals))
    if cfg.get("compare_to"):
        print(f"\n{name} - {other_name} (paired bootstrap, {paired_resamples} resamples, seed {seed}, 95% interval, "
              f"two-sided p):")
        for metric, d in paired["metrics"].items():
            print(f"  {metric:<10} {d['difference']:+.4f}  [{d['low']:+.4f}, {d['high']:+.4f}]  "
                  f"p={p_text(d['p_value'], paired_resamples)}")
    print(f"{len(references)} images scored -> {out / 'metrics.json'}")

    if report:  # report.html beside metrics.json
        compared = (other_name, cfg.compare_to, other, paired) if cfg.get("compare_to") else None
        page = evaluation_report(out / "report.html", report, preset, scored, name, cfg.predictions, cfg.references,
                                 references, intervals.get(name), compared, resamples, seed)
        print(f"report -> {page}")


if __name__ == "__main__":
    sys.exit(run_command(main))
