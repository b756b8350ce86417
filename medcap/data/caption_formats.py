"""Readers for caption and report data sets: ImageCLEFmedical caption (ROCOv2 layout), R2Gen's
``annotation.json`` (IU X-Ray, MIMIC-CXR) and LLaVA / ShareGPT conversations. See ``medcap.data.records`` for
what they return."""

import os
from pathlib import Path
from typing import Any, Callable

from medcap.data.problems import (DataFileError, Problem, Source, SplitMissingError, read_csv, read_json,
                                  read_jsonl)
from medcap.data.records import Samples, caption_not_text, drop_duplicates, id_text, image_list, sample_record
from medcap.data.reports import VARIANTS as REPORT_VARIANTS, clean_report_iu_xray, clean_report_mimic_cxr

IMAGE_TAG = "<image>"
USER_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")
VIEWS = ("separate", "first", "average")


def index_images(folder: Path, extensions: list[str]) -> dict[str, Path]:
    """{ID: file} for the files in ``folder`` whose name ends with one of ``extensions`` (case-insensitive); an
    ID with several files gets the one whose extension comes first in ``extensions``."""
    if not folder.is_dir():
        raise DataFileError(f"image folder not found: {folder}")
    found: dict[str, tuple[int, Path]] = {}
    lowered = [e.lower() for e in extensions]
    for entry in os.scandir(folder):
        name = entry.name.lower()
        for rank, ext in enumerate(lowered):
            if name.endswith(ext) and entry.is_file():
                stem = entry.name[:-len(ext)]
                if stem not in found or rank < found[stem][0]:
                    found[stem] = (rank, Path(entry.path))
                break
    return {stem: path for stem, (_, path) in found.items()}


def read_concepts(path: Path) -> dict[str, list[str]]:
    rows, problems = read_csv(path, ["ID", "CUIs"], "ID")
    if problems:
        raise DataFileError(str(problems[0]))
    concepts: dict[str, list[str]] = {}
    for line_no, row in rows:
        sample_id = row["ID"].strip()
        if sample_id in concepts:
            raise DataFileError(f"{path}:{line_no}: sample {sample_id!r}: duplicate id")
        concepts[sample_id] = [c.strip() for c in row["CUIs"].split(";") if c.strip()]
    return concepts


def read_imageclef(data_dir: Path, split: str, captions_file: str = "{split}_captions.csv",
                   concepts_file: str | None = None, image_folder: str = "{split}",
                   image_extensions: list[str] = (".jpg", ".jpeg", ".png")) -> Samples:
    """ImageCLEFmedical caption / ROCOv2: ``{split}_captions.csv`` (``ID,Caption``) and images in ``{split}/``
    named by ID plus one of ``image_extensions``. Without a captions file (the challenge's test split) the
    samples are the images of the folder, without captions (generation only). ``concepts_file`` (e.g.
    ``{split}_concepts.csv``, ``ID,CUIs`` with ``;``-separated CUIs) adds ``concepts`` (a list; empty for IDs the
    file lacks) to each sample; it may be absent only for a split without captions."""
    captions_path = data_dir / captions_file.format(split=split)
    folder = data_dir / image_folder.format(split=split)
    if not captions_path.is_file() and not folder.is_dir():
        raise SplitMissingError(f"split {split!r} is absent: neither {captions_path} nor {folder}/ exists")
    image_extensions = list(image_extensions)
    images = index_images(folder, image_extensions)
    samples, problems = [], []
    if not captions_path.is_file():
        for sample_id, path in sorted(images.items()):
            samples.append(sample_record(sample_id, [str(path)], None, Source(str(path.parent), item=path.name),
                                         caption_field="Caption", image_field="ID"))
        return samples, problems
    rows, problems = read_csv(captions_path, ["ID", "Caption"], "ID")
    concepts = read_concepts(data_dir / concepts_file.format(split=split)) if concepts_file else None
    for line_no, row in rows:
        source, sample_id = Source(str(captions_path), line_no), row["ID"].strip()
        if not sample_id:
            problems.append(Problem(source, None, "ID", "missing id", "field 'ID' is missing or empty"))
        elif sample_id not in images:
            problems.append(Problem(source, sample_id, "ID", "image file not found",
                                    f"field 'ID': no image file {sample_id}{{{','.join(image_extensions)}}} in "
                                    f"{data_dir / image_folder.format(split=split)}"))
        else:
            extra = {} if concepts is None else {"concepts": concepts.get(sample_id, [])}
            samples.append(sample_record(sample_id, [str(images[sample_id])], row["Caption"], source,
                                         caption_field="Caption", image_field="ID", **extra))
    return drop_duplicates(samples, problems, "ID"), problems


def read_r2gen(data_dir: Path, split: str, cleaner: Callable[..., str], annotation_file: str = "annotation.json",
               image_folder: str = "images", clean_report: bool | str = False, views: str = "separate",
               num_views: int = 2) -> Samples:
    """R2Gen's ``annotation.json``: ``{"train": [...], "val": [...], "test": [...]}`` with ``id``, ``report`` and
    ``image_path`` (a list, relative to ``image_folder``). ``clean_report`` applies R2Gen's cleaning for the data
    set (``medcap.data.reports``): ``true`` (or ``r2gen``) R2Gen's rules, ``r2gengpt`` R2GenGPT's variant.
    ``views``: ``separate`` = one image-token block per view, in the file's order
    (IU X-Ray: frontal, lateral); ``first`` = the first view only; ``average`` = exactly ``num_views`` views per
    study, a shorter study repeating its last view, for a model built with ``views_per_block=num_views`` (it
    averages the encoded views into one block). R2GenGPT averaged the views present: the same for its
    ``num_views=2`` (one view averages to itself), not for 3 or more, where the repeated view weighs more."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    variant = "r2gen" if clean_report is True else clean_report
    if clean_report and variant not in REPORT_VARIANTS:
        raise ValueError(f"clean_report must be true, false or one of {list(REPORT_VARIANTS)}, got {clean_report!r}")
    path = data_dir / annotation_file
    annotation = read_json(path)
    if not isinstance(annotation, dict) or not all(isinstance(v, list) for v in annotation.values()):
        raise DataFileError(f"{path}: expected {{split: [samples]}} (R2Gen's layout)")
    if split not in annotation:
        raise SplitMissingError(f"{path}: no split {split!r}; the file has {', '.join(map(repr, annotation))}")
    samples, problems = [], []
    for index, item in enumerate(annotation[split]):
        source = Source(str(path), item=f"{split}[{index}]")
        if not isinstance(item, dict):
            problems.append(Problem(source, None, None, "malformed row", "expected a JSON object"))
            continue
        sample_id = id_text(item.get("id"))
        images = image_list(item.get("image_path"))
        report = item.get("report")
        if not sample_id:
            problems.append(Problem(source, None, "id", "missing id", "field 'id' is missing or empty"))
        elif not images:
            problems.append(Problem(source, sample_id, "image_path", "missing image",
                                    "field 'image_path' is missing or empty"))
        elif caption_not_text(report, source, sample_id, "report"):
            problems.append(caption_not_text(report, source, sample_id, "report"))
        else:
            if views == "first":
                images = images[:1]
            elif views == "average":
                if len(images) > num_views:
                    problems.append(Problem(source, sample_id, "image_path", "too many views",
                                            f"field 'image_path': {len(images)} views, views: average takes at most "
                                            f"num_views={num_views}"))
                    continue
                images = images + images[-1:] * (num_views - len(images))
            if report is not None and clean_report:
                report = cleaner(report, variant)
                # a report that cleans to nothing but separators is an empty caption
                report = report if report.replace(".", "").strip() else ""
            samples.append(sample_record(sample_id, [str(data_dir / image_folder / p) for p in images], report,
                                         source, caption_field="report", image_field="image_path"))
    return drop_duplicates(samples, problems), problems


def read_r2gen_iuxray(data_dir: Path, split: str, **options: Any) -> Samples:
    return read_r2gen(data_dir, split, clean_report_iu_xray, **options)


def read_r2gen_mimic(data_dir: Path, split: str, **options: Any) -> Samples:
    return read_r2gen(data_dir, split, clean_report_mimic_cxr, **options)


def conversation_turns(conversations: Any) -> tuple[list[dict[str, str]] | None, str]:
    """[{"role": "user" | "assistant", "content": text}] alternating from the user, or (None, what is wrong)."""
    if not isinstance(conversations, list) or not conversations:
        return None, "field 'conversations' is missing or empty"
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None, f"field 'conversations[{i}].value' is missing or not text"
        speaker = turn.get("from")
        role = "user" if speaker in USER_ROLES else "assistant" if speaker in ASSISTANT_ROLES else None
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return None, (f"field 'conversations[{i}].from' is {speaker!r}; turns must alternate "
                          f"human/gpt, starting with human")
        turns.append({"role": role, "content": turn["value"]})
    return turns, ""


def read_llava(data_dir: Path, split: str, annotation_file: str = "{split}.json", image_folder: str = ".") -> Samples:
    """LLaVA / ShareGPT conversations: a JSON list (or JSONL) of ``{"id", "image" (a path or a list, relative to
    ``image_folder``), "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``.
    A single-turn conversation becomes prompt (the human turn without its ``<image>`` tags: the model puts the
    image placeholders itself) + caption (the gpt turn; None when the conversation ends with the human turn).
    Every sample keeps ``turns`` (tags removed); the data set trains on every exchange of a multi-turn one.
    The number of ``<image>`` tags in the conversation must equal the number of images."""
    path = data_dir / annotation_file.format(split=split)
    if "{split}" in annotation_file and not path.is_file():
        raise SplitMissingError(f"split {split!r} is absent: {path} does not exist")
    if path.suffix == ".jsonl":
        items = [(Source(str(path), line_no), item) for line_no, item in read_jsonl(path)]
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataFileError(f"{path}: expected a JSON list of conversations (LLaVA's layout)")
        items = [(Source(str(path), item=f"[{i}]"), item) for i, item in enumerate(data)]
    samples, problems = [], []
    for source, item in items:
        if not isinstance(item, dict):
            problems.append(Problem(source, None, None, "malformed row", "expected a JSON object"))
            continue
        sample_id = id_text(item.get("id"))
        if not sample_id:
            problems.append(Problem(source, None, "id", "missing id", "field 'id' is missing or empty"))
            continue
        images = image_list(item.get("image"))
        turns, error = conversation_turns(item.get("conversations"))
        if turns is None:
            problems.append(Problem(source, sample_id, "conversations", "malformed conversation", error))
            continue
        tags = sum(t["content"].count(IMAGE_TAG) for t in turns)
        if not images:
            problems.append(Problem(source, sample_id, "image", "missing image", "field 'image' is missing or empty"))
        elif tags != len(images):
            problems.append(Problem(source, sample_id, "conversations", "image tag count mismatch",
                                    f"field 'conversations' has {tags} {IMAGE_TAG} tag(s) but field 'image' "
                                    f"names {len(images)} image(s)"))
        else:
            turns = [{"role": t["role"], "content": t["content"].replace(IMAGE_TAG, "").strip()} for t in turns]
            caption = turns[1]["content"] if len(turns) > 1 else None
            samples.append(sample_record(sample_id, [str(data_dir / image_folder / p) for p in images], caption,
                                         source, prompt=turns[0]["content"], caption_field="conversations[1].value",
                                         turns=turns))
    return drop_duplicates(samples, problems), problems


SEED_PLACEHOLDER = "①"  # the medcap seed's image placeholder character (Llama 3 token 118075)


def _meta_fields(meta: Any) -> dict[str, str] | None:
    """The medcap seed's ``meta``: ``key=value`` pairs joined by ``;`` (``dir=/data/images``); None if malformed."""
    if meta in (None, ""):
        return {}
    if not isinstance(meta, str):
        return None
    pairs = [part.split("=", 1) for part in meta.split(";") if part.strip()]
    return {k.strip(): v for k, v in pairs} if all(len(p) == 2 for p in pairs) else None


def read_sharegpt(data_dir: Path, split: str, annotation_file: str = "{split}.json", image_folder: str = ".",
                  placeholder: str = SEED_PLACEHOLDER) -> Samples:
    """The ShareGPT files the medcap seed converts its training sets to: a JSON list of ``{"conversations":
    [{"from": "human", "value": "①①...①"}, {"from": "gpt", "value": caption}], "image": file name, "meta":
    "dir=<image folder>"}`` (``meta`` holds ``;``-separated ``key=value`` pairs; a relative ``dir`` is taken
    relative to ``data_dir``; without ``meta`` the image is in ``image_folder``). The run of ``placeholder``
    characters in the first human turn stands for the image (the model puts its own placeholders there) and
    must not appear in later turns; the text left around it is the prompt. The seed's files hold no text there
    (None: the data set's ``prompt`` applies, ``prompt: ""`` gives a user turn of placeholders only); its
    ``instruction_type`` random / fixed files add ``"\\n\\n" + instruction``. ID: the item's ``id``, else its
    index in the list. Multi-turn conversations train on every answer, as ``read_llava``'s."""
    path = data_dir / annotation_file.format(split=split)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of conversations (ShareGPT, the medcap seed's layout)")
    samples, problems = [], []
    for index, item in enumerate(data):
        source = Source(str(path), item=f"[{index}]")
        if not isinstance(item, dict):
            problems.append(Problem(source, None, None, "malformed row", "expected a JSON object"))
            continue
        sample_id = id_text(item.get("id")) or str(index)  # no id (or a blank one): its place in the list
        turns, error = conversation_turns(item.get("conversations"))
        meta = _meta_fields(item.get("meta"))
        image = item.get("image")
        if turns is None:
            problems.append(Problem(source, sample_id, "conversations", "malformed conversation", error))
        elif placeholder not in turns[0]["content"]:
            problems.append(Problem(source, sample_id, "conversations[0].value", "no image placeholder",
                                    f"field 'conversations[0].value' holds no {placeholder!r} (the image's place)"))
        elif any(placeholder in t["content"] for t in turns[1:]):
            later = next(i for i, t in enumerate(turns) if i and placeholder in t["content"])
            problems.append(Problem(source, sample_id, f"conversations[{later}].value", "placeholder in a later turn",
                                    f"field 'conversations[{later}].value' holds {placeholder!r}; only the first "
                                    f"human turn carries the image"))
        elif not isinstance(image, str) or not image.strip():
            problems.append(Problem(source, sample_id, "image", "missing image", "field 'image' is missing or empty"))
        elif meta is None:
            problems.append(Problem(source, sample_id, "meta", "malformed meta",
                                    f"field 'meta' must be ';'-separated key=value pairs, found {item.get('meta')!r}"))
        else:
            folder = data_dir / meta["dir"] if meta.get("dir") else data_dir / image_folder
            turns = [{"role": turns[0]["role"], "content": turns[0]["content"].replace(placeholder, "").strip()},
                     *turns[1:]]
            caption = turns[1]["content"] if len(turns) > 1 else None
            samples.append(sample_record(sample_id, [str(folder / image)], caption, source,
                                         prompt=turns[0]["content"] or None, caption_field="conversations[1].value",
                                         image_field="image", turns=turns))
    return drop_duplicates(samples, problems), problems
