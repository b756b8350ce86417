"""Medical VQA: multiple-choice questions (OmniMedVQA) and closed or open ones (VQA-RAD), answered by the
vision-language model in one of four modes (``mode``):

- ``direct``: the question with its options (``A. text`` lines) and ``instruction``; the generated answer is
  mapped to an option by ``medcap.metrics.vqa.parse_choice`` (letter, or option text).
- ``two_stage`` (medcap's): the model first describes the image (``describe_prompt``; once per image, not per
  question), then the question is the second user turn of that conversation; the answer is parsed as above.
- ``likelihood``: no generation and no judge LLM: every option is scored as the assistant's answer by its
  log-probability (``normalize``: ``mean`` per token or ``sum``; ``option_format``; ``with_end``) and the best
  one is the answer. All options of a question go through the model in one packed row, the image encoded once
  (``medcap.vqa``). Questions without options are answered by generation, as in ``direct``.
- ``two_stage_likelihood``: the options are scored after the description turn.

Writes ``output_dir/predictions.jsonl`` (id, question, options, raw answer, parsed option, correct option,
whether it is right, modality, question type; the description and the option scores where the mode has them),
``predictions.csv`` (``ID,caption``, scorable with ``medcap run evaluate --config eval/vqa``), ``metrics.json``
(accuracy, macro accuracy over ``group_by``, per group; the evaluation's VQA scorer) and, with ``bootstrap`` > 0,
``intervals.json``; ``report.html`` (unless ``report=false``) shows every question with its image, options and
the parsed answer, right or wrong (``medcap.report``).

    medcap run vqa --config demo/vqa mode=likelihood
"""

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training
from tqdm import tqdm

from medcap.atomic import write_json, write_text
from medcap.data.images import load_image
from medcap.generation import generate
from medcap.metrics import bootstrap_ci, evaluate, format_table, write_csv_predictions
from medcap.metrics.vqa import parse_choice
from medcap.report import report_options, vqa_report
from medcap.runtime import caption_dataset, decoding_settings, device_and_dtype, log, setup_model_and_tokenizer
from medcap.vqa import (NORMALIZE, answer_prompt, correct_option, option_ids, pick_option, question_text,
                        score_options, vqa_questions)

MODES = ("direct", "two_stage", "likelihood", "two_stage_likelihood")


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class VQARun:
    """The model, tokenizer, data set and settings of one run, and the steps that answer its questions."""

    def __init__(self, cfg: DictConfig, model, tokenizer, dataset, dtype: torch.dtype):
        self.cfg, self.model, self.tokenizer, self.dataset, self.dtype = cfg, model, tokenizer, dataset, dtype
        self.generator = torch.Generator(device=next(model.parameters()).device)

    def images(self, questions: list[dict]) -> torch.Tensor:
        """All images of ``questions``, in order (the layout ``generate`` and the model take)."""
        return torch.stack([self.dataset.transform(load_image(path)) for q in questions for path in q["images"]])

    def image_tokens(self, question: dict) -> int:
        return self.model.tokens_per_image * len(question["images"]) // self.model.views_per_block

    def generate(self, prompts: list[list[int]], images: torch.Tensor, max_new_tokens: int,
                 batch_index: int) -> list[str]:
        cfg = self.cfg
        self.generator.manual_seed(cfg.seed + batch_index)
        settings = {**decoding_settings(cfg), "max_new_tokens": max_new_tokens}
        outputs = generate(self.model, prompts, images.to(self.dtype), stop_ids=self.tokenizer.stop_ids,
                           pad_id=self.tokenizer.pad_id, generator=self.generator, **settings)
        return [self.tokenizer.decode(ids).strip() for ids in outputs]

    def describe(self, questions: list[dict]) -> dict[tuple, str]:
        """{image paths: description}, each distinct image (set) described once."""
        firsts = list({tuple(q["images"]): q for q in questions}.values())
        descriptions = {}
        for index, batch in enumerate(tqdm(batches(firsts, self.cfg.batch_size), desc="describe", unit="batch")):
            prompts = [self.tokenizer.prompt_ids(self.cfg.describe_prompt, self.image_tokens(q), self.dataset.system)
                       for q in batch]
            texts = self.generate(prompts, self.images(batch), self.cfg.description_max_new_tokens, 10_000 + index)
            descriptions.update({tuple(q["images"]): text for q, text in zip(batch, texts)})
        return descriptions

    def prompt(self, question: dict, description: str | None, instruction: str | None) -> list[int]:
        text = question_text(question, instruction, self.cfg.get("closed_instruction"))
        return answer_prompt(self.tokenizer, text, self.image_tokens(question), self.dataset.system,
                             self.cfg.get("describe_prompt"), description)

    def answer_by_generation(self, questions: list[dict], descriptions: dict[tuple, str]) -> dict[str, dict]:
        answers = {}
        for index, batch in enumerate(tqdm(batches(questions, self.cfg.batch_size), desc="answer", unit="batch")):
            prompts = [self.prompt(q, descriptions.get(tuple(q["images"])), self.cfg.get("instruction"))
                       for q in batch]
            texts = self.generate(prompts, self.images(batch), self.cfg.max_new_tokens, index)
            answers.update({q["id"]: {"raw_answer": text} for q, text in zip(batch, texts)})
        return answers

    def rows(self, questions: list[dict]) -> list[list[dict]]:
        """Questions about the same image(s) share a row, at most ``questions_per_row`` of them."""
        by_images: dict[tuple, list[dict]] = {}
        for q in questions:
            by_images.setdefault(tuple(q["images"]), []).append(q)
        size = self.cfg.get("questions_per_row", 1)
        return [chunk for group in by_images.values() for chunk in batches(group, size)]

    def answer_by_likelihood(self, questions: list[dict], descriptions: dict[tuple, str]) -> dict[str, dict]:
        cfg = self.cfg
        answers = {}
        for rows in tqdm(batches(self.rows(questions), cfg.score_batch_size), desc="score", unit="batch"):
            batch = [q for row in rows for q in row]
            index, start = [], 0  # the positions in ``batch`` of each row's questions
            for row in rows:
                index.append(list(range(start, start + len(row))))
                start += len(row)
            prompts = [self.prompt(q, descriptions.get(tuple(q["images"])), cfg.get("likelihood_instruction"))
                       for q in batch]
            continuations = [option_ids(self.tokenizer, q["options"], cfg.option_format, cfg.with_end) for q in batch]
            scores = score_options(self.model, prompts, continuations, self.images([row[0] for row in rows]),
                                   self.tokenizer.pad_id, index, self.model.decoder.max_seq_len,
                                   [q["id"] for q in batch])
            for q, option_scores in zip(batch, scores):
                letters = list(q["options"])
                best = letters[pick_option(option_scores, cfg.normalize)]
                answers[q["id"]] = {"raw_answer": best, "option_scores": {
                    letter: {"sum": total, "tokens": n, "mean": total / n}
                    for letter, (total, n) in zip(letters, option_scores)}}
        return answers


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="vqa", cfg=cfg)
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode.endswith("likelihood") and cfg.normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {cfg.normalize!r}")
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    model, tokenizer = setup_model_and_tokenizer(cfg, device, dtype, checkpoint=cfg.get("checkpoint"))
    model.eval()
    dataset = caption_dataset(cfg.dataset, tokenizer, model, with_captions=False)
    questions = vqa_questions(dataset.samples)
    if cfg.get("limit"):
        questions = questions[:cfg.limit]
    run = VQARun(cfg, model, tokenizer, dataset, dtype)

    t0 = time.perf_counter()
    two_stage = cfg.mode.startswith("two_stage")
    descriptions = run.describe(questions) if two_stage else {}
    if cfg.mode.endswith("likelihood"):
        with_options = [q for q in questions if q["options"]]
        answers = run.answer_by_likelihood(with_options, descriptions)
        open_questions = [q for q in questions if not q["options"]]
        if open_questions:
            answers.update(run.answer_by_generation(open_questions, descriptions))
    else:
        answers = run.answer_by_generation(questions, descriptions)
    seconds = time.perf_counter() - t0

    predictions = {q["id"]: answers[q["id"]]["raw_answer"] for q in questions}
    references = {q["id"]: {k: q[k] for k in ("answer", "options", "modality", "question_type")} for q in questions}
    scored = evaluate(predictions, references, preset="vqa", group_by=cfg.get("group_by", "modality"))
    correct = dict(zip(scored.ids, scored.per_sample["correct"].tolist()))

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for q in questions:
        raw = predictions[q["id"]]
        row = {"id": q["id"], "question": q["question"], "options": q["options"], "raw_answer": raw,
               "parsed_option": parse_choice(raw, q["options"]) if q["options"] else None,
               "correct_option": correct_option(q["answer"], q["options"]), "answer": q["answer"],
               "correct": bool(correct[q["id"]]), "modality": q["modality"], "question_type": q["question_type"]}
        if two_stage:
            row["description"] = descriptions[tuple(q["images"])]
        if "option_scores" in answers[q["id"]]:
            row["option_scores"] = answers[q["id"]]["option_scores"]
        rows.append(json.dumps(row))
    write_text(out / "predictions.jsonl", "\n".join(rows) + "\n")
    # one line per answer (scoring ignores whitespace runs; medcap.metrics.read_predictions drops newlines inside
    # quoted fields, gluing words together)
    write_csv_predictions(out / "predictions.csv", {k: " ".join(v.split()) for k, v in predictions.items()})
    write_json(out / "metrics.json", scored.corpus)
    intervals = {}
    resamples = int(cfg.get("bootstrap", 0))
    if resamples:
        intervals = {cfg.mode: bootstrap_ci(scored, resamples, cfg.seed)}
        write_json(out / "intervals.json", {"level": 0.95, "resamples": resamples, "seed": cfg.seed,
                                             "intervals": intervals[cfg.mode]})
    print(format_table({cfg.mode: scored.corpus}, intervals=intervals))
    log.info(f"{len(questions)} questions ({cfg.mode}) in {seconds:.1f} s -> {out / 'metrics.json'}")
    report = report_options(cfg.get("report", True))  # report.html beside metrics.json; report=false: none
    if report:
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        page = vqa_report(out / "report.html", records, scored.corpus, intervals.get(cfg.mode),
                          {q["id"]: q["images"] for q in questions}, report, cfg.mode)
        log.info(f"report -> {page}")


if __name__ == "__main__":
    sys.exit(main())
