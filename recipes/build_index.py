"""Retrieval index over a caption set: every image of ``dataset`` is embedded (the encoder's tokens mean-pooled,
averaged over a sample's images, L2-normalised) and saved with its id, caption and image paths, plus a faiss
index (``index.kind``: ``flat`` exact inner product = cosine; ``ivf`` or ``hnsw`` for large sets) and a
meta.json naming the encoder that produced it and the dtype it ran in. The nearest-caption baseline, kNN few-shot
and the synthesizer read it; they embed their queries with the same encoder in the same dtype.

    medcap run build_index --config demo/build_index
    medcap run build_index --config demo/build_index encoder._component_=medcap.models.encoders.efficientnet_lite0 \
        checkpoint=null output_dir=outputs/demo/index_imagenet      # another encoder

The encoder is ``encoder`` (any module of ``medcap.models.encoders``; a medcap checkpoint's trained encoder
weights are loaded into it) when set, else the vision encoder of ``model`` with ``checkpoint`` loaded.
"""

import sys
import time
from datetime import datetime, timezone

from omegaconf import DictConfig
from torchtune import config

from medcap.retrieval import CaptionIndex, check_index_folder, embedder_from_source, retrieval_source
from medcap.runtime import device_and_dtype, log
from medcap.command import run_command


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="build_index", cfg=cfg)
    check_index_folder(cfg.output_dir)  # before the images are embedded
    device, dtype = device_and_dtype(cfg)
    if cfg.get("encoder") is not None and cfg.get("model") is not None:
        log.info("encoder is set: the images are embedded with it, not with model's vision encoder")
    source = retrieval_source(cfg.get("model"), cfg.get("encoder"), cfg.get("checkpoint"), cfg.get("seed", 0))
    embedder = embedder_from_source(source, device, dtype)

    dataset = config.instantiate(cfg.dataset)  # read for its samples only: ids, image paths, captions
    samples = dataset.samples
    t0 = time.perf_counter()
    embeddings = embedder.embed_samples(samples, cfg.get("batch_size", 32), cfg.get("num_workers", 0))
    settings = {"kind": "flat", **(dict(cfg.index) if cfg.get("index") else {})}
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = {"source": source, "dataset": dataset.name, "created": created, "dtype": str(dtype).removeprefix("torch."),
            "pooling": "encoder tokens averaged, then a sample's images, then L2-normalised"}
    index = CaptionIndex(embeddings, [s["id"] for s in samples], [s["caption"] for s in samples],
                         [s["images"] for s in samples], settings, meta)
    out = index.save(cfg.output_dir)
    log.info(f"{len(index)} embeddings of dimension {index.dim} ({settings['kind']} index) in "
             f"{time.perf_counter() - t0:.1f} s -> {out}")


if __name__ == "__main__":
    sys.exit(run_command(main))
