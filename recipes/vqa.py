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
- ``two_stage_judge`` (the medcap seed's protocol, ``medcap.vqa``): turn 1 is the image placeholders alone and the
  model's description, at most min(``description_max_new_tokens``, ``describe_context_len`` - prompt - question -
  5) tokens, once per image (the first question asked about it sets the budget); turn 2 is the bare question
  (no options), at most ``max_new_tokens``; then the same LLM, text only, is shown the question, that answer and
  the options and asked for the letter (``judge_max_new_tokens``); the first character of its reply is the
  answer. Questions without options (VQA-RAD closed) are scored on the turn-2 answer. ``judge_missing: nan``
  builds the judge prompt the seed's run built (empty options printed ``nan``); ``prompt_encoding: seed_text``
  feeds the model what the seed's generation recipe fed it (``medcap.text.seed_prompts``).

``shuffle_seed`` (not null) puts the questions in the order ``random.Random(shuffle_seed).shuffle`` gives, as the
seed ordered OmniMedVQA (options stay in the file's order); ``limit`` then takes the first N of that order.

Writes ``output_dir/predictions.jsonl`` (id, question, options, raw answer, parsed option, correct option,
whether it is right, modality, question type; the description and the option scores where the mode has them),
``predictions.csv`` (``ID,caption``, scorable with ``medcap run evaluate --config eval/vqa``), ``metrics.json``
(accuracy, macro accuracy over ``group_by``, per group; the evaluation's VQA scorer) and, with ``bootstrap`` > 0,
``intervals.json``; ``report.html`` (unless ``report=false``) shows every question with its image, options and
the parsed answer, right or wrong (``medcap.report``).

    medcap run vqa --config demo/vqa mode=likelihood
"""

import json
import random
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training
from tqdm import tqdm

from medcap.command import run_command
from medcap.atomic import remove_earlier, write_json, write_text
from medcap.data.dataset import load_sample_images
from medcap.generation import generate
from medcap.metrics import bootstrap_ci, evaluate, format_table, write_csv_predictions
from medcap.metrics.vqa import parse_choice
from medcap.report import report_options, scoring_outputs, vqa_report
from medcap.runtime import caption_dataset, decoding_settings, device_and_dtype, log, setup_model_and_tokenizer
from medcap.text.seed_prompts import rendered_prompt, seed_text_ids
from medcap.vqa import (JUDGE_MISSING, NORMALIZE, answer_prompt, correct_option, description_budget, judged_option,
                        judge_text, option_ids, pick_option, question_text, score_options, vqa_questions)

MODES = ("direct", "two_stage", "likelihood", "two_stage_likelihood", "two_stage_judge")
PROMPT_ENCODINGS = ("chat", "seed_text")


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class VQARun:
    """The model, tokenizer, data set and settings of one run, and the steps that answer its questions."""

    def __init__(self, cfg: DictConfig, model, tokenizer, dataset, dtype: torch.dtype):
        self.cfg, self.model, self.tokenizer, self.dataset, self.dtype = cfg, model, tokenizer, dataset, dtype
        self.generator = torch.Generator(device=next(model.parameters()).device)

    def images(self, questions: list[dict]) -> torch.Tensor:
        """All images of ``questions``, in order (the layout ``generate`` and the model take)."""
        return torch.cat([load_sample_images(q, self.dataset.transform, max_pixels=self.dataset.max_image_pixels)
                          for q in questions])

    def image_tokens(self, question: dict) -> int:
        return self.model.tokens_per_image * len(question["images"]) // self.model.views_per_block

    def generate(self, prompts: list[list[int]], images: torch.Tensor | None, max_new_tokens: int,
                 batch_index: int) -> list[str]:
        return [self.tokenizer.decode(ids).strip()
                for ids in self.generate_ids(prompts, images, max_new_tokens, batch_index)]

    def generate_ids(self, prompts: list[list[int]], images: torch.Tensor | None, max_new_tokens: int,
                     batch_index: int) -> list[list[int]]:
        cfg = self.cfg
        self.generator.manual_seed(cfg.seed + batch_index)
        settings = {**decoding_settings(cfg), "max_new_tokens": max_new_tokens}
        return generate(self.model, prompts, None if images is None else images.to(self.dtype),
                        stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id, generator=self.generator,
                        **settings)

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

    # --- two_stage_judge ---------------------------------------------------------------------------------------

    def encoded(self, ids: list[int]) -> list[int]:
        """Chat prompt ids as the model gets them: as built (``chat``) or as the seed's recipe re-encoded them."""
        return ids if self.cfg.get("prompt_encoding", "chat") == "chat" else seed_text_ids(self.tokenizer, ids)

    def describe_ids(self, question: dict) -> list[int]:
        """Turn 1: the image placeholders alone."""
        return self.tokenizer.prompt_ids("", self.image_tokens(question), self.dataset.system)

    def description_tokens(self, question: dict) -> int:
        """The description's budget for the image of ``question`` (see ``medcap.vqa.description_budget``). The
        prompt is the two-turn prompt with an empty description and an empty question; with ``seed_text`` both
        lengths are counted as the seed counted them: its rendered text re-encoded, with BOS and EOS."""
        tok, cfg = self.tokenizer, self.cfg
        empty = self.describe_ids(question) + tok.answer_ids("") + tok.followup_ids("")
        if cfg.get("prompt_encoding", "chat") == "chat":
            prompt_len, question_len = len(empty), len(tok.encode(question["question"].strip()))
        else:
            prompt_len, question_len = len(tok.encode(rendered_prompt(tok, empty))) + 2, len(
                tok.encode(question["question"])) + 2
        budget = description_budget(cfg.description_max_new_tokens, cfg.get("describe_context_len"), prompt_len,
                                    question_len)
        if budget < 1:
            raise ValueError(f"question {question['id']!r}: no room for a description in describe_context_len="
                             f"{cfg.describe_context_len} (prompt {prompt_len} + question {question_len} + 5 tokens)")
        return budget

    def answer_by_judge(self, questions: list[dict]) -> tuple[dict[str, dict], dict[tuple, str]]:
        cfg, tok = self.cfg, self.tokenizer
        firsts: dict[tuple, dict] = {}
        for q in questions:
            firsts.setdefault(tuple(q["images"]), q)
        descriptions = {}
        beams = decoding_settings(cfg).get("num_beams", 1) > 1
        for index, batch in enumerate(tqdm(batches(list(firsts.values()), cfg.batch_size), desc="describe",
                                           unit="batch")):
            budgets = [self.description_tokens(q) for q in batch]
            # token by token, the first n tokens of a longer generation are the generation of n tokens: the batch
            # runs to its longest budget; a beam search of n tokens is not the start of a longer one: one run per
            # budget, as the seed described each image with its own max_new_tokens
            for budget in sorted(set(budgets)) if beams else [max(budgets)]:
                group = [(q, n) for q, n in zip(batch, budgets) if n == budget or not beams]
                outputs = self.generate_ids([self.encoded(self.describe_ids(q)) for q, _ in group],
                                            self.images([q for q, _ in group]), budget, 10_000 + index)
                descriptions.update({tuple(q["images"]): tok.decode(ids[:n]).strip()
                                     for (q, n), ids in zip(group, outputs)})
        answers = {}
        for index, batch in enumerate(tqdm(batches(questions, cfg.batch_size), desc="answer", unit="batch")):
            prompts = [self.encoded(self.describe_ids(q) + tok.answer_ids(descriptions[tuple(q["images"])])
                                    + tok.followup_ids(q["question"])) for q in batch]
            texts = self.generate(prompts, self.images(batch), cfg.max_new_tokens, index)
            answers.update({q["id"]: {"raw_answer": text, "answer_text": text} for q, text in zip(batch, texts)})
        with_options = [q for q in questions if q["options"]]
        missing = cfg.get("judge_missing", "omit")
        for index, batch in enumerate(tqdm(batches(with_options, cfg.batch_size), desc="judge", unit="batch")):
            prompts = [self.encoded(tok.prompt_ids(judge_text(q["question"], answers[q["id"]]["answer_text"],
                                                              q["options"], missing)))
                       for q in batch]
            replies = self.generate(prompts, None, cfg.get("judge_max_new_tokens", 20), 20_000 + index)
            for q, reply in zip(batch, replies):
                answers[q["id"]].update(raw_answer=judged_option(reply, q["options"]), judge_reply=reply)
        return answers, descriptions

    def rows(self, questions: list[dict]) -> list[list[dict]]:
        """Questions about the same image(s) share a row, at most ``questions_per_row`` of them."""
        by_images: dict[tuple, list[dict]] = {}
        for q in questions:
            by_images.setdefault(tuple(q["images"]), []).append(q)
        size = self.cfg.get("questions_per_row", 1)
        return [chunk for group in by_images.values() for chunk in batches(group, size)]

    def option_tokens(self, q: dict) -> list[list[int]]:
        try:
            return option_ids(self.tokenizer, q["options"], self.cfg.option_format, self.cfg.with_end)
        except ValueError as error:
            raise ValueError(f"{q['source']}: sample {q['id']!r}: field 'options': {error}") from None

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
            continuations = [self.option_tokens(q) for q in batch]
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
    if cfg.get("prompt_encoding", "chat") not in PROMPT_ENCODINGS:
        raise ValueError(f"prompt_encoding must be one of {PROMPT_ENCODINGS}, got {cfg.prompt_encoding!r}")
    if cfg.get("judge_missing", "omit") not in JUDGE_MISSING:
        raise ValueError(f"judge_missing must be one of {JUDGE_MISSING}, got {cfg.judge_missing!r}")
    report = report_options(cfg.get("report", True))  # checked before the model runs
    if int(cfg.get("bootstrap", 0)) < 0:
        raise ValueError(f"bootstrap must be at least 0, got {cfg.bootstrap}")
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    model, tokenizer = setup_model_and_tokenizer(cfg, device, dtype, checkpoint=cfg.get("checkpoint"))
    model.eval()
    dataset = caption_dataset(cfg.dataset, tokenizer, model, with_captions=False)
    questions = vqa_questions(dataset.samples)
    if cfg.get("shuffle_seed") is not None:
        random.Random(cfg.shuffle_seed).shuffle(questions)
    if cfg.get("limit"):
        questions = questions[:cfg.limit]
    run = VQARun(cfg, model, tokenizer, dataset, dtype)

    t0 = time.perf_counter()
    two_stage = cfg.mode.startswith("two_stage")
    descriptions = run.describe(questions) if two_stage and cfg.mode != "two_stage_judge" else {}
    if cfg.mode == "two_stage_judge":
        answers, descriptions = run.answer_by_judge(questions)
    elif cfg.mode.endswith("likelihood"):
        with_options = [q for q in questions if q["options"]]
        answers = run.answer_by_likelihood(with_options, descriptions)
        open_questions = [q for q in questions if not q["options"]]
        if open_questions:
            answers.update(run.answer_by_generation(open_questions, descriptions))
    else:
        answers = run.answer_by_generation(questions, descriptions)
    seconds = time.perf_counter() - t0

    predictions = {q["id"]: answers[q["id"]]["raw_answer"] for q in questions}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in remove_earlier(scoring_outputs(out)):
        log.info(f"removed the earlier run's {path}")
    # one line per answer (scoring ignores whitespace runs; medcap.metrics.read_predictions drops newlines inside
    # quoted fields, gluing words together); written before scoring, which cannot lose it
    write_csv_predictions(out / "predictions.csv", {k: " ".join(v.split()) for k, v in predictions.items()})
    references = {q["id"]: {k: q[k] for k in ("id", "answer", "options", "modality", "question_type")}
                  for q in questions}
    scored = evaluate(predictions, references, preset="vqa", group_by=cfg.get("group_by", "modality"))
    correct = dict(zip(scored.ids, scored.per_sample["correct"].tolist()))

    rows = []
    for q in questions:
        raw = predictions[q["id"]]
        row = {"id": q["id"], "question": q["question"], "options": q["options"], "raw_answer": raw,
               "parsed_option": parse_choice(raw, q["options"]) if q["options"] else None,
               "correct_option": correct_option(q["answer"], q["options"]), "answer": q["answer"],
               "correct": bool(correct[q["id"]]), "modality": q["modality"], "question_type": q["question_type"]}
        if two_stage:
            row["description"] = descriptions[tuple(q["images"])]
        row.update({k: v for k, v in answers[q["id"]].items() if k != "raw_answer"})  # option scores, judge reply
        rows.append(json.dumps(row))
    write_text(out / "predictions.jsonl", "\n".join(rows) + "\n")
    write_json(out / "metrics.json", scored.corpus)
    intervals = {}
    resamples = int(cfg.get("bootstrap", 0))
    if resamples:
        intervals = {cfg.mode: bootstrap_ci(scored, resamples, cfg.seed)}
        write_json(out / "intervals.json", {"level": 0.95, "resamples": resamples, "seed": cfg.seed,
                                             "intervals": intervals[cfg.mode]})
    print(format_table({cfg.mode: scored.corpus}, intervals=intervals))
    log.info(f"{len(questions)} questions ({cfg.mode}) in {seconds:.1f} s -> {out / 'metrics.json'}")
    if report:  # report.html beside metrics.json
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        page = vqa_report(out / "report.html", records, scored.corpus, intervals.get(cfg.mode),
                          {q["id"]: q["images"] for q in questions}, report, cfg.mode)
        log.info(f"report -> {page}")


if __name__ == "__main__":
    sys.exit(run_command(main))
