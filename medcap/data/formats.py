"""The data formats a ``CaptionDataset`` reads (``format:`` in a config), each by its reader; options are the
reader's keyword arguments. Readers: ``medcap.data.caption_formats`` and ``medcap.data.vqa_formats``."""

import inspect
from pathlib import Path
from typing import Any, Callable

from medcap.data.caption_formats import (read_imageclef, read_llava, read_r2gen, read_r2gen_iuxray, read_r2gen_mimic,
                                         read_sharegpt)
from medcap.data.problems import DataFileError
from medcap.data.records import Samples
from medcap.data.vqa_formats import read_omnimedvqa, read_vqa_rad


READERS: dict[str, Callable[..., Samples]] = {
    "imageclef": read_imageclef,
    "r2gen_iuxray": read_r2gen_iuxray,
    "r2gen_mimic": read_r2gen_mimic,
    "llava": read_llava,
    "sharegpt": read_sharegpt,
    "omnimedvqa": read_omnimedvqa,
    "vqa_rad": read_vqa_rad,
}


def format_options(format: str) -> list[str]:
    reader = read_r2gen if format.startswith("r2gen") else READERS[format]
    skip = {"data_dir", "split", "cleaner"}
    return [name for name in inspect.signature(reader).parameters if name not in skip]


def read_samples(format: str, data_dir: str | Path, split: str, **options: Any) -> Samples:
    """The samples of ``split`` of the data set in ``data_dir``, read by the reader of ``format``."""
    if format not in READERS:
        raise ValueError(f"unknown data format {format!r}; formats: {', '.join(READERS)} (or give a manifest)")
    unknown = sorted(set(options) - set(format_options(format)))
    if unknown:
        raise ValueError(f"format {format!r} has no option(s) {', '.join(unknown)}; its options are "
                         f"{', '.join(format_options(format))}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataFileError(f"data_dir not found: {data_dir}")
    return READERS[format](data_dir, split, **options)
