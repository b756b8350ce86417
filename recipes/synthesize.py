"""Synthesizer: a text LLM rewrites each draft caption of one run (``drafts``, an ``ID,caption`` CSV) with the
captions of the image's nearest training neighbours in the prompt. The neighbours are searched in the retrieval
index ``index_dir`` (``medcap run build_index``) for the images of ``dataset``, or read from ``neighbours`` (JSONL
or CSV: see medcap/synthesis.py; ``knn_fewshot``'s neighbours.csv works, its captions taken from ``index_dir``, its
rank-0 rows meaning an image without neighbours). A draft ID the file does not list at all is an error.

Writes ``output_dir/predictions.csv`` (every draft ID once, in the drafts' order), ``output_dir/synthesis.jsonl``
(per ID: the draft, the neighbour captions shown, the LLM's reply, the caption kept) and, when searched,
``output_dir/neighbours.jsonl`` (the neighbours' IDs, captions and cosine similarities).

    medcap run synthesize --config demo/synthesize drafts=run/predictions.csv
    medcap run synthesize --config demo/synthesize neighbours=outputs/demo/knn_fewshot/neighbours.csv

The prompt: ``template`` (``{instruction}``, ``{neighbours}``: one ``neighbour_line`` per neighbour, ``{draft}``,
``{image}``: the image's ID), or ``fallback_template`` for an image without neighbours (null: the template with
an empty list); ``draft_turn: true`` sends the draft as a user turn of its own first (AUEB, Llama 3 chat format).
A reply that is empty after cleaning keeps the draft (counted in the log). Decoding keys are those of
``generate``; greedy by default.

    medcap run synthesize --config aueb/synthesize llm_dir=DIR data_dir=DIR drafts=RUN/predictions.csv index_dir=INDEX
"""

import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from torchtune import config, training

from medcap.atomic import remove_earlier, write_text
from medcap.command import run_command
from medcap.fuser import check_prompts_fit, generate_texts, text_lm_and_tokenizer
from medcap.metrics import read_predictions, write_csv_predictions
from medcap.runtime import decoding_settings, device_and_dtype, log
from medcap.synthesis import (DEFAULT_INSTRUCTION, DEFAULT_NEIGHBOUR_LINE, DEFAULT_TEMPLATE, check_template,
                              clean_output, read_neighbours, search_neighbours, synthesis_prompt, synthesis_prompt_ids)


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="synthesize", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    instruction = cfg.get("instruction") or DEFAULT_INSTRUCTION
    template = cfg.get("template") or DEFAULT_TEMPLATE
    fallback = cfg.get("fallback_template")
    draft_turn = bool(cfg.get("draft_turn", False))
    neighbour_line = cfg.get("neighbour_line") or DEFAULT_NEIGHBOUR_LINE
    check_template(template, draft_turn)
    if fallback is not None:
        check_template(fallback, draft_turn, fallback=True)
    k = cfg.num_neighbours
    if k < 1:
        raise ValueError(f"num_neighbours must be at least 1, got {k}")

    drafts = read_predictions(cfg.drafts)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("neighbours"):
        source = cfg.neighbours
        neighbours = read_neighbours(source, cfg.get("index_dir"))
        if cfg.get("threshold") is not None:
            log.info(f"threshold={cfg.threshold} is not applied: the neighbours are {source}'s, as the search that "
                     f"wrote it kept them")
        if Path(source).resolve() != (out / "neighbours.jsonl").resolve():  # a search's, which this run did not use
            for path in remove_earlier([out / "neighbours.jsonl"]):
                log.info(f"removed the earlier run's {path} (this one read {source})")
    else:
        if not cfg.get("index_dir") or not cfg.get("dataset"):
            raise ValueError("set neighbours (a file), or index_dir and dataset (the query images) to search them")
        source = f"the images of {cfg.dataset.get('manifest') or cfg.dataset.get('data_dir')}"
        samples = config.instantiate(cfg.dataset, with_captions=False).samples
        from medcap.retrieval import search_options  # faiss only when searching

        found = search_neighbours(cfg.index_dir, samples, k, device, dtype, cfg.get("embed_batch_size", 32),
                                  cfg.get("trusted_components") or (), **search_options(cfg))
        write_text(out / "neighbours.jsonl", "".join(json.dumps({"id": i, "neighbours": row}) + "\n"
                                                     for i, row in found.items()))
        neighbours = {i: [n["caption"] for n in row] for i, row in found.items()}
    missing = [i for i in drafts if i not in neighbours]
    if missing:
        raise ValueError(f"{source}: no neighbours for ID {missing[0]!r} (in {cfg.drafts})"
                         + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    few = [i for i in drafts if len(neighbours[i]) < k]
    if few:
        none = sum(not neighbours[i] for i in few)
        then = "the fallback template" if fallback is not None else "an empty neighbour list"
        log.warning(f"{len(few)} IDs have fewer than num_neighbours={k} neighbours (e.g. {few[0]!r}: "
                    f"{len(neighbours[few[0]])}); they are prompted with what there is, the {none} without any "
                    f"with {then}")

    model, tokenizer = text_lm_and_tokenizer(cfg, device, dtype, seq2seq=False)  # a chat LLM
    model.eval()
    ids = list(drafts)
    texts = [synthesis_prompt(drafts[i], neighbours[i], k, instruction, template, neighbour_line, image=i,
                              fallback=fallback, draft_turn=draft_turn) for i in ids]
    prompts = [synthesis_prompt_ids(tokenizer, text, drafts[i], cfg.get("system"), draft_turn)
               for i, text in zip(ids, texts)]
    decoding = decoding_settings(cfg)
    check_prompts_fit(model, ids, prompts, decoding["max_new_tokens"],
                      f"of the draft in {cfg.drafts} and {k} neighbours")
    t0 = time.perf_counter()
    replies = generate_texts(model, tokenizer, prompts, batch_size=cfg.batch_size, seed=cfg.seed,
                             progress="synthesize", **decoding)
    seconds = time.perf_counter() - t0

    predictions, lines, kept_draft = {}, [], 0
    for sample_id, text, reply in zip(ids, texts, replies):
        caption = clean_output(reply, cfg.get("first_line_only", True))
        if not caption:
            caption, kept_draft = drafts[sample_id], kept_draft + 1
        predictions[sample_id] = caption
        lines.append(json.dumps({"id": sample_id, "draft": drafts[sample_id], "neighbours": neighbours[sample_id][:k],
                                 "prompt": text, "reply": reply, "caption": caption}) + "\n")
    write_text(out / "synthesis.jsonl", "".join(lines))
    write_csv_predictions(out / "predictions.csv", predictions)
    log.info(f"{len(predictions)} captions in {seconds:.1f} s ({kept_draft} empty replies kept their draft) "
             f"-> {out / 'predictions.csv'}")


if __name__ == "__main__":
    sys.exit(run_command(main))
