"""Check a data set before training on it: reads every split through the config's ``dataset`` node, opens every
image once, and prints counts, image sizes, caption lengths in tokens and every problem with its sample ID.

    medcap run prepare_data --config data/imageclef data_dir=DIR [on_bad_sample=skip] [splits=[train,valid]]

A split the data set does not have at all (no files, no entries; e.g. ImageCLEF's ``test/`` not downloaded) is
reported as absent and does not count, unless training reads it (``dataset.split``, ``val_dataset.split``).
Exits 0 when every split that is there can be used as configured, 1 when a problem would stop training: a file
that cannot be read, a bad sample with ``on_bad_sample: error``, a prompt that leaves no room for the caption, a
training split without captions or with no usable sample left. With ``on_bad_sample=skip`` bad samples are left
out, counted by reason and listed in ``skipped_samples_csv``.
"""

import statistics
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medcap.data.dataset import CaptionDataset
from medcap.data.problems import BadSampleError, CaptionsMissingError, SplitMissingError
from medcap.command import run_command

ABSENT = "absent"


def spread(values: list[int]) -> str:
    return f"min {min(values)} / median {statistics.median(values):g} / max {max(values)}"


def training_splits(cfg: DictConfig) -> dict[str, str]:
    """{split: the config key that trains or validates on it}."""
    keys = {}
    for node in ("val_dataset", "dataset"):
        if cfg.get(node) is not None and cfg[node].get("split") is not None:
            keys[str(cfg[node].split)] = f"{node}.split"
    return keys


def load_split(cfg: DictConfig, split: str, tokenizer, on_bad_sample: str, trains_on: str | None
               ) -> tuple[CaptionDataset | str | None, bool]:
    """The split's data set, ABSENT when the data set has no such split, or None when it cannot be used (after
    printing why); and whether it has captions. ``trains_on``: the config key that trains on this split, if any
    (such a split needs captions)."""
    views = cfg.dataset.get("num_views", 2) if cfg.dataset.get("views") == "average" else 1
    kwargs: dict[str, Any] = dict(split=split, tokenizer=tokenizer, tokens_per_image=cfg.tokens_per_image,
                                  transform=None, check_images=True, image_workers=cfg.get("image_workers", 8),
                                  on_bad_sample=on_bad_sample, views_per_block=views)
    try:
        try:
            return config.instantiate(cfg.dataset, **kwargs), True
        except CaptionsMissingError as e:
            if trains_on:
                print(f"{split}: {e}; but {trains_on} trains on it, which needs captions")
                return None, False
            return config.instantiate(cfg.dataset, with_captions=False, **kwargs), False
    except SplitMissingError as e:
        if trains_on:
            print(f"{split}: absent ({e}), but {trains_on} reads it")
            return None, False
        print(f"{split}: absent ({e})")
        return ABSENT, False
    except BadSampleError as e:
        print(f"{split}: {len(e.problems)} problem(s) (on_bad_sample: error):")
        for problem in e.problems:
            print(f"  {problem}")
    except (OSError, ValueError, NotImplementedError) as e:
        print(f"{split}: cannot be used: {e}")
    return None, False


def report_split(dataset: CaptionDataset, split: str, has_captions: bool, tokenizer) -> bool:
    """Prints the split's statistics and problems; False when a problem would stop training."""
    samples = dataset.samples
    images = list(dict.fromkeys(p for s in samples for p in s["images"]))  # VQA questions may share an image
    kind = "" if has_captions else " (no captions: generation only)"
    print(f"{split}: {len(samples)} samples, {len(images)} images{kind}")
    sizes = [dataset.image_sizes[p] for p in images if p in dataset.image_sizes]
    if sizes:
        print(f"  image width  {spread([w for w, _ in sizes])} px")
        print(f"  image height {spread([h for _, h in sizes])} px")
    usable = True
    if has_captions:
        lengths = [len(tokenizer.encode(s["caption"])) for s in samples]
        print(f"  caption tokens {spread(lengths)}, mean {statistics.fmean(lengths):.1f} ({type(tokenizer).__name__})")
        truncated = 0
        for s in samples:
            try:
                truncated += dataset.tokenize(s)["truncated"]
            except ValueError as e:  # the prompt alone does not fit max_seq_len
                print(f"  {s['source']}: sample {s['id']!r}: {e}")
                usable = False
        print(f"  {truncated} caption(s) truncated to fit max_seq_len={dataset.max_seq_len} "
              f"({dataset.tokens_per_image} tokens per image, never cut)")
    if dataset.problems:
        print(f"  {dataset.skip_summary()}")
        for problem in dataset.problems:
            print(f"    {problem}")
    return usable


@config.parse
def main(cfg: DictConfig) -> int:
    if OmegaConf.is_missing(cfg, "data_dir"):
        print("data_dir is required: medcap run prepare_data --config data/NAME data_dir=DIR")
        return 1
    on_bad_sample = cfg.get("on_bad_sample") or cfg.dataset.get("on_bad_sample", "error")
    skipped_csv = cfg.dataset.get("skipped_samples_csv")
    if skipped_csv:
        Path(skipped_csv).unlink(missing_ok=True)  # this run's list only
    tokenizer = config.instantiate(cfg.tokenizer)
    print(f"data set: {cfg.dataset.get('format') or cfg.dataset.get('manifest')} in {cfg.data_dir} "
          f"(on_bad_sample: {on_bad_sample})")
    usable, absent = True, []
    trains = training_splits(cfg)
    for split in cfg.splits:
        dataset, has_captions = load_split(cfg, split, tokenizer, on_bad_sample, trains.get(str(split)))
        if isinstance(dataset, str):  # ABSENT
            absent.append(str(split))
            continue
        split_usable = dataset is not None and report_split(dataset, split, has_captions, tokenizer)
        usable = usable and split_usable
    if skipped_csv and Path(skipped_csv).is_file():
        print(f"skipped samples listed in {skipped_csv}")
    if len(absent) == len(cfg.splits):
        print(f"FAILED: none of the splits {', '.join(absent)} is there; check data_dir")
        return 1
    if usable:
        print(f"OK: every split present can be used (absent: {', '.join(absent)})" if absent else
              "OK: every split can be used")
    elif on_bad_sample == "skip":
        print("FAILED: fix the problems above (skipping samples cannot help with them)")
    else:
        print("FAILED: fix the problems above, or set on_bad_sample=skip to leave bad samples out")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(run_command(main))
