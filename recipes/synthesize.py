"""Synthesizer: a text LLM rewrites each draft caption of one run (``drafts``, an ``ID,caption`` CSV) with the
captions of the image's nearest training neighbours in the prompt. The neighbours are searched in the retrieval
index ``index_dir`` (``medcap run build_index``) for the images of ``dataset``, or read from ``neighbours`` (JSONL
or CSV: see medcap/synthesis.py; ``knn_fewshot``'s neighbours.csv works, its captions taken from ``index_dir``).

Writes ``output_dir/predictions.csv`` (every draft ID once, in the drafts' order), ``output_dir/synthesis.jsonl``
(per ID: the draft, the neighbour captions shown, the LLM's reply, the caption kept) and, when searched,
``output_dir/neighbours.jsonl`` (the neighbours' IDs, captions and cosine similarities).

    medcap run synthesize --config demo/synthesize drafts=run/predictions.csv
    medcap run synthesize --config demo/synthesize neighbours=outputs/demo/knn_fewshot/neighbours.csv

A reply that is empty after cleaning keeps the draft (counted in the log). Decoding keys are those of
``generate``; greedy by default.
"""

import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from torchtune import config, training

from medcap.fuser import generate_texts, text_lm_and_tokenizer
from medcap.metrics import read_predictions, write_csv_predictions
from medcap.runtime import decoding_settings, device_and_dtype, log
from medcap.synthesis import (DEFAULT_INSTRUCTION, DEFAULT_TEMPLATE, check_template, clean_output, read_neighbours,
                              search_neighbours, synthesis_prompt)


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="synthesize", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    instruction = cfg.get("instruction") or DEFAULT_INSTRUCTION
    template = cfg.get("template") or DEFAULT_TEMPLATE
    check_template(template)
    k = cfg.num_neighbours
    if k < 1:
        raise ValueError(f"num_neighbours must be at least 1, got {k}")

    drafts = read_predictions(cfg.drafts)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("neighbours"):
        source = cfg.neighbours
        neighbours = read_neighbours(source, cfg.get("index_dir"))
    else:
        if not cfg.get("index_dir") or not cfg.get("dataset"):
            raise ValueError("set neighbours (a file), or index_dir and dataset (the query images) to search them")
        source = f"the images of {cfg.dataset.get('manifest') or cfg.dataset.get('data_dir')}"
        samples = config.instantiate(cfg.dataset, with_captions=False).samples
        from medcap.retrieval import search_options  # faiss only when searching

        found = search_neighbours(cfg.index_dir, samples, k, device, dtype, cfg.get("embed_batch_size", 32),
                                  **search_options(cfg))
        with (out / "neighbours.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": i, "neighbours": row}) + "\n" for i, row in found.items())
        neighbours = {i: [n["caption"] for n in row] for i, row in found.items()}
    missing = [i for i in drafts if i not in neighbours]
    if missing:
        raise ValueError(f"{source}: no neighbours for ID {missing[0]!r} (in {cfg.drafts})"
                         + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    few = [i for i in drafts if len(neighbours[i]) < k]
    if few:
        log.warning(f"{len(few)} IDs have fewer than num_neighbours={k} neighbours (e.g. {few[0]!r}: "
                    f"{len(neighbours[few[0]])}); they are prompted with what there is")

    model, tokenizer = text_lm_and_tokenizer(cfg, device, dtype)
    model.eval()
    ids = list(drafts)
    texts = [synthesis_prompt(drafts[i], neighbours[i], k, instruction, template) for i in ids]
    prompts = [tokenizer.prompt_ids(text, 0, cfg.get("system")) for text in texts]
    t0 = time.perf_counter()
    replies = generate_texts(model, tokenizer, prompts, batch_size=cfg.batch_size, seed=cfg.seed,
                             progress="synthesize", **decoding_settings(cfg))
    seconds = time.perf_counter() - t0

    predictions, kept_draft = {}, 0
    with (out / "synthesis.jsonl").open("w", encoding="utf-8") as f:
        for sample_id, reply in zip(ids, replies):
            caption = clean_output(reply, cfg.get("first_line_only", True))
            if not caption:
                caption, kept_draft = drafts[sample_id], kept_draft + 1
            predictions[sample_id] = caption
            f.write(json.dumps({"id": sample_id, "draft": drafts[sample_id], "neighbours": neighbours[sample_id][:k],
                                "reply": reply, "caption": caption}) + "\n")
    write_csv_predictions(out / "predictions.csv", predictions)
    log.info(f"{len(predictions)} captions in {seconds:.1f} s ({kept_draft} empty replies kept their draft) "
             f"-> {out / 'predictions.csv'}")


if __name__ == "__main__":
    sys.exit(main())
