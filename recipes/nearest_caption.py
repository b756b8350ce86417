"""Nearest-neighbour baseline: each image of ``dataset`` gets the caption of its most similar image in a
retrieval index (``medcap run build_index``), embedded with the encoder the index names in its meta.json.
Writes ``predictions.csv`` (``ID,caption``) and ``neighbours.csv`` (``ID,rank,neighbour_ID,similarity``).

    medcap run nearest_caption --config demo/nearest_caption
    medcap run evaluate --config demo/evaluate predictions=outputs/demo/nearest_caption/predictions.csv

The query image itself is never its own neighbour (same id or image file, or an identical embedding, see
``exclude_self`` / ``exclude_identical``); below ``threshold`` an image gets ``fallback_caption``.
"""

import sys
from pathlib import Path

from omegaconf import DictConfig
from torchtune import config

from medcap.metrics import write_csv_predictions
from medcap.retrieval import CaptionIndex, index_embedder, search_options, write_neighbours_csv
from medcap.runtime import device_and_dtype, log
from medcap.command import run_command


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="nearest_caption", cfg=cfg)
    device, dtype = device_and_dtype(cfg)
    index = CaptionIndex.load(cfg.index_dir)
    embedder = index_embedder(index, cfg.index_dir, device, dtype, cfg.get("trusted_components") or ())
    samples = config.instantiate(cfg.dataset, with_captions=False).samples
    neighbours = index.search_samples(embedder, samples, 1, cfg.get("batch_size", 32), cfg.get("num_workers", 0),
                                      **search_options(cfg))

    fallback = cfg.get("fallback_caption", "")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_predictions(out / "predictions.csv",
                          {s["id"]: found[0].caption if found else fallback for s, found in zip(samples, neighbours)})
    write_neighbours_csv(out / "neighbours.csv", [s["id"] for s in samples], neighbours)  # rank 0 for a fallback
    missing = sum(not found for found in neighbours)
    if missing:
        log.warning(f"{missing} image(s) had no neighbour at or above threshold={cfg.get('threshold')}: they got "
                    f"fallback_caption={fallback!r}")
    log.info(f"{len(samples)} captions from the nearest of {len(index)} indexed images -> {out / 'predictions.csv'}")


if __name__ == "__main__":
    sys.exit(run_command(main))
