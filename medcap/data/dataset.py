"""Caption data sets, read from a JSONL or CSV manifest or from a data set's published layout (``format``, see
``medcap.data.formats``), and the collate that batches them."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchtune import utils
from torchvision import transforms as T

from medcap.data.formats import read_samples
from medcap.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, load_image, open_image
from medcap.data.problems import (ON_BAD_SAMPLE, BadSampleError, CaptionsMissingError, Problem, skipped_entries,
                                  summary, write_skipped_csv)
from medcap.data.records import read_manifest_samples
from medcap.text import IGNORE_INDEX, build_conversation_sample, build_sample
from medcap.text.seed_prompts import assistant_header_length

DEFAULT_PROMPT = "Describe the findings in this image."
log = utils.get_logger("INFO")


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL (one object per line) or CSV manifest with ``id``, ``image`` (a path, or a list of paths;
    in CSV several paths are joined with ``;``), ``caption`` and optional ``prompt``. Relative image paths are
    resolved against the manifest's folder. Raises BadSampleError listing every bad row."""
    samples, problems = read_manifest_samples(path)
    if problems:
        raise BadSampleError(problems)
    return samples


RESIZE_MODES = ("crop", "pad", "squash")
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


class PadToSquare:
    """The image centred on a square canvas of colour ``fill`` (LLaVA 1.5's expand-to-square)."""

    def __init__(self, fill: tuple[int, int, int]):
        self.fill = fill

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), self.fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas


class ImageTransform:
    """PIL image -> normalised tensor ``[3, size, size]`` for an encoder, resized by ``resize_mode``:

    - ``crop``: the shorter side resized to ``size`` (antialiased), then the centre ``size`` x ``size`` cut out:
      the evaluation transform of CLIP / open_clip and BiomedCLIP (open_clip's ``resize_mode: shortest``);
    - ``pad``: the image centred on a square of the mean colour (``int(mean * 255)`` per channel, as LLaVA 1.5
      computes it), then resized to ``size`` x ``size``: LLaVA 1.5's ``image_aspect_ratio: pad``;
    - ``squash``: resized to ``size`` x ``size`` whatever its aspect ratio (transformers' ViTImageProcessor, which
      R2GenGPT's Swin uses; open_clip's ``resize_mode: squash``).

    ``interpolation``: ``bicubic``, ``bilinear`` or ``nearest`` (PIL's resampling filters).
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], resize_mode: str = "squash",
                 interpolation: str = "bicubic"):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
        self.size, self.mean, self.std, self.resize_mode = size, tuple(mean), tuple(std), resize_mode
        self.interpolation = interpolation
        mode = INTERPOLATIONS[interpolation]
        if resize_mode == "crop":
            resize = [T.Resize(size, interpolation=mode, antialias=True), T.CenterCrop(size)]
        else:
            resize = [T.Resize((size, size), interpolation=mode, antialias=True)]
            if resize_mode == "pad":
                resize.insert(0, PadToSquare(tuple(int(m * 255) for m in self.mean)))
        self.steps = T.Compose([*resize, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.steps(image)

    def with_resize_mode(self, resize_mode: str) -> "ImageTransform":
        return ImageTransform(self.size, self.mean, self.std, resize_mode, self.interpolation)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, resize_mode={self.resize_mode!r}, " \
               f"interpolation={self.interpolation!r})"


def image_transform(encoder: torch.nn.Module, resize_mode: str | None = None) -> ImageTransform:
    """The transform to the encoder's square input, normalised with the statistics its weights expect; resized
    by ``resize_mode`` or else by the encoder's own ``resize_mode`` (the one its model was trained with; see
    ``medcap.models.encoders``), ``squash`` for an encoder without one, with the encoder's ``interpolation``
    (bicubic for an encoder without one)."""
    return ImageTransform(encoder.image_size, encoder.mean, encoder.std,
                          resize_mode or getattr(encoder, "resize_mode", "squash"),
                          getattr(encoder, "interpolation", "bicubic"))


def image_size_or_error(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                        ) -> tuple[int, int] | ImageLoadError:
    """The (width, height) the file holds, after decoding it (downscaled, see ``load_image``)."""
    try:
        return open_image(path, max_pixels=max_pixels)[1]
    except ImageLoadError as e:
        return e


def check_image_files(samples: list[dict[str, Any]], decode: bool, workers: int = 8,
                      max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                      ) -> tuple[list[Problem], dict[str, tuple[int, int]]]:
    """Problems of image files that are missing or empty and, with ``decode``, that cannot be decoded (opened
    in ``workers`` threads, each file once, downscaled to ``max_pixels``), and the (width, height) of every
    decoded image as the file holds it."""
    paths = list(dict.fromkeys(p for s in samples for p in s["images"]))  # each file once, in order
    bad: dict[str, tuple[str, str]] = {}
    for path in paths:
        if not Path(path).is_file():
            bad[path] = ("image file not found", f"image file not found: {path}")
        elif Path(path).stat().st_size == 0:
            bad[path] = ("empty image file", f"image file is empty (0 bytes): {path}")
    sizes = {}
    if decode:
        readable = [p for p in paths if p not in bad]
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            sizes_or_errors = pool.map(lambda path: image_size_or_error(path, max_pixels), readable)
            for path, result in zip(readable, sizes_or_errors):
                if isinstance(result, ImageLoadError):
                    bad[path] = ("unreadable image", str(result))
                else:
                    sizes[path] = result
    problems = []
    for s in samples:
        for path in s["images"]:
            if path in bad:
                reason, detail = bad[path]
                problems.append(Problem(s["source"], s["id"], s["image_field"], reason,
                                        f"field {s['image_field']!r}: {detail}"))
    return problems, sizes


def sample_problems(samples: list[dict[str, Any]], with_captions: bool) -> list[Problem]:
    """When captions are needed: empty captions, conversations whose human turns are not each answered, and empty
    answers after the first (a split read only for generation needs neither)."""
    if not with_captions:
        return []
    problems = []
    for s in samples:
        field = s["caption_field"]
        if not isinstance(s["caption"], str) or not s["caption"].strip():
            problems.append(Problem(s["source"], s["id"], field, "empty caption",
                                    f"field {field!r} is missing or empty"))
        turns = s.get("turns") or []
        if len(turns) % 2:
            problems.append(Problem(s["source"], s["id"], "conversations", "unanswered turn",
                                    f"field 'conversations' holds {len(turns)} turns; each human turn needs "
                                    f"the gpt turn that answers it"))
        empty = [i for i in range(3, len(turns), 2) if not str(turns[i].get("content") or "").strip()]
        if empty:  # the first answer is the caption, checked above
            problems.append(Problem(s["source"], s["id"], f"conversations[{empty[0]}].value", "empty caption",
                                    f"field 'conversations[{empty[0]}].value' (an answer) is missing or empty"))
    return problems


def outside_problems(samples: list[dict[str, Any]], data_dir: str | Path) -> list[Problem]:
    """Image paths that resolve (through ``..``, an absolute path or a symbolic link) to a place outside
    ``data_dir``."""
    root = Path(data_dir).resolve()
    problems = []
    for s in samples:
        for path in s["images"]:
            resolved = Path(path).resolve()
            if not resolved.is_relative_to(root):
                problems.append(Problem(s["source"], s["id"], s["image_field"], "image outside data_dir",
                                        f"field {s['image_field']!r}: image path {path} resolves to {resolved}, "
                                        f"outside data_dir {root} (allow_outside_data_dir: true allows it)"))
                break
    return problems


def load_sample_images(sample: dict[str, Any], transform, hint: str = "",
                       max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """A sample's images (each downscaled on load to at most ``max_pixels`` pixels), transformed and stacked
    ``[n_images, C, H, W]``; an image that cannot be read is an error naming the manifest, the sample ID and the
    field."""
    images = []
    for path in sample["images"]:
        try:
            images.append(transform(load_image(path, max_pixels=max_pixels)))
        except (OSError, ValueError) as e:
            raise ValueError(f"{sample.get('source', '')}: sample {sample['id']!r}: "
                             f"field {sample.get('image_field', 'image')!r}: {e}{hint}") from None
    return torch.stack(images)


class CaptionDataset(Dataset):
    """Image(s) + prompt -> caption samples, read from a ``manifest`` or from ``format`` + ``data_dir`` +
    ``split`` (+ the format's options as further keyword arguments, see ``medcap.data.formats``). With
    ``with_captions=False`` (generation) only the prompt is tokenised and captions may be absent.

    Bad samples (unreadable rows, duplicate IDs, missing or empty image files, empty captions, ...) are all
    found when the data set is built. ``on_bad_sample="error"`` raises a BadSampleError that lists them;
    ``"skip"`` leaves them out, logs how many and why, and lists them in ``skipped_samples_csv`` if set.
    ``check_images=True`` also decodes every image once (``image_workers`` threads) so that corrupt files are
    found before training rather than when a batch reaches them; it is off by default because it reads the
    whole data set (``medcap run prepare_data`` does it once). ``problems`` holds what was found,
    ``image_sizes`` the (width, height) of each decoded image.

    With ``format``, an image path that resolves outside ``data_dir`` (``..``, an absolute path, a symbolic link)
    is a bad sample unless ``allow_outside_data_dir``. Images of more than ``max_image_pixels`` pixels are
    downscaled on load (``medcap.data.images.load_image``; None: no limit). ``resize_mode`` (``crop``, ``pad``,
    ``squash``; None: the encoder's default) replaces the resize step of a ``transform`` that
    ``image_transform`` built. ``label_assistant_header=True`` also puts labels on each assistant turn's header
    (``<|start_header_id|>assistant<|end_header_id|>\n\n`` in Llama 3), as the medcap seed's training did
    (configs/medcap/seed_textplus). ``max_answer_tokens`` limits each caption and its end token (R2GenGPT's
    report limit: 60 tokens for IU X-Ray, 100 for MIMIC-CXR), besides ``max_seq_len``.
    """

    def __init__(
        self,
        manifest: str | None = None,
        tokenizer=None,
        tokens_per_image: int = 0,
        transform: Callable | None = None,
        prompt: str = DEFAULT_PROMPT,
        system: str | None = None,
        max_seq_len: int = 512,
        with_captions: bool = True,
        *,
        format: str | None = None,
        data_dir: str | None = None,
        split: str | None = None,
        on_bad_sample: str = "error",
        check_images: bool = False,
        image_workers: int = 8,
        skipped_samples_csv: str | None = None,
        views_per_block: int = 1,
        allow_outside_data_dir: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        resize_mode: str | None = None,
        label_assistant_header: bool = False,
        max_answer_tokens: int | None = None,
        **format_options: Any,
    ):
        if format_options.get("views") == "average" and format_options.get("num_views", 2) != views_per_block:
            raise ValueError(f"views: average gives {format_options.get('num_views', 2)} views per study, but the "
                             f"model averages views_per_block={views_per_block}: build the model with "
                             f"views_per_block={format_options.get('num_views', 2)} (model.views_per_block)")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if (manifest is None) == (format is None):
            raise ValueError("give either manifest, or format + data_dir + split")
        if manifest is not None:
            if format_options:
                raise ValueError(f"unknown option(s) {sorted(format_options)}: a manifest data set takes no format "
                                 f"options")
            self.name = str(manifest)
            samples, problems = read_manifest_samples(manifest)
        else:
            if data_dir is None or split is None:
                raise ValueError(f"format {format!r} needs data_dir and split")
            self.name = f"{format}:{split}"
            samples, problems = read_samples(format, data_dir, split, **format_options)
        if resize_mode is not None:
            if resize_mode not in RESIZE_MODES:
                raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
            if transform is not None:
                if not isinstance(transform, ImageTransform):
                    raise ValueError(f"resize_mode={resize_mode!r} needs a transform that image_transform built, "
                                     f"got {transform!r}")
                transform = transform.with_resize_mode(resize_mode)
        if with_captions and samples and all(s["caption"] is None for s in samples):
            files = ", ".join(dict.fromkeys(s["source"].file for s in samples))
            field = samples[0]["caption_field"]
            raise CaptionsMissingError(f"{self.name} has no captions: no sample in {files} has field {field!r} "
                                       f"(a challenge's test split, for example); it can only be used to generate "
                                       f"(medcap run generate)")
        found = sample_problems(samples, with_captions)
        if format is not None and not allow_outside_data_dir:
            found += outside_problems(samples, data_dir)
        outside = {p.source for p in found if p.reason == "image outside data_dir"}  # never opened
        image_problems, self.image_sizes = check_image_files([s for s in samples if s["source"] not in outside],
                                                             check_images, image_workers, max_image_pixels)
        found += image_problems
        self.max_image_pixels = max_image_pixels
        bad = {p.source for p in found}
        self.samples = [s for s in samples if s["source"] not in bad]
        # by line within each file (problems of JSON items keep the order they were found in)
        self.problems = sorted(problems + found, key=lambda p: (p.source.file, p.source.line or 0))
        self.manifest = manifest
        self.tokenizer, self.tokens_per_image, self.transform = tokenizer, tokens_per_image, transform
        self.views_per_block = views_per_block
        self.prompt, self.system, self.max_seq_len, self.with_captions = prompt, system, max_seq_len, with_captions
        self.max_answer_tokens = max_answer_tokens
        # the medcap seed's labels also covered each assistant turn's header (its torchtune masked whole messages)
        self.labelled_header = assistant_header_length(tokenizer) if label_assistant_header else 0
        if self.problems and on_bad_sample == "error":
            raise BadSampleError(self.problems)
        # rewritten even without problems, so that an earlier run's list for this data set does not linger
        if skipped_samples_csv and (self.problems or Path(skipped_samples_csv).is_file()):
            write_skipped_csv(skipped_samples_csv, self.name, self.problems)
        if self.problems:
            listed = f"; listed in {skipped_samples_csv}" if skipped_samples_csv else ""
            log.warning(f"{self.name}: {self.skip_summary()}{listed}")
        if not self.samples:
            raise ValueError(f"{self.name}: no usable samples ({self.skip_summary()})")

    def skip_summary(self) -> str:
        return summary(self.problems, len(self.samples) + skipped_entries(self.problems))

    def __len__(self) -> int:
        return len(self.samples)

    def tokenize(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``tokens`` and ``labels`` (on the answers only) of a sample with its caption, or of every exchange of
        a multi-turn conversation (``turns``)."""
        turns = sample.get("turns") or []
        if len(turns) > 2:  # the first user turn falls back on the data set's prompt, as a single exchange does
            exchanges = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
            exchanges[0] = (sample["prompt"] or self.prompt, exchanges[0][1])
            return build_conversation_sample(self.tokenizer, exchanges, self.image_tokens(sample), self.max_seq_len,
                                             self.system, labelled_header=self.labelled_header,
                                             max_answer_tokens=self.max_answer_tokens)
        return build_sample(self.tokenizer, sample["prompt"] or self.prompt, sample["caption"],
                            self.image_tokens(sample), self.max_seq_len, self.system,
                            labelled_header=self.labelled_header, max_answer_tokens=self.max_answer_tokens)

    def image_tokens(self, sample: dict[str, Any]) -> int:
        """Placeholders for a sample's images: one block per image, or per ``views_per_block`` averaged views."""
        if len(sample["images"]) % self.views_per_block:
            raise ValueError(f"{sample['source']}: sample {sample['id']!r}: field {sample['image_field']!r}: "
                             f"{len(sample['images'])} images do not form blocks of views_per_block="
                             f"{self.views_per_block}")
        return self.tokens_per_image * len(sample["images"]) // self.views_per_block

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        prompt = s["prompt"] or self.prompt
        num_image_tokens = self.image_tokens(s)
        if self.with_captions:
            try:
                sample = self.tokenize(s)
            except ValueError as e:  # the prompt leaves no room for the caption
                raise ValueError(f"{s['source']}: sample {s['id']!r}: {e}") from None
        else:
            sample = {"tokens": self.tokenizer.prompt_ids(prompt, num_image_tokens, self.system)}
        hint = " (check_images: true or `medcap run prepare_data` finds such files before training)"
        return {"id": s["id"], "images": load_sample_images(s, self.transform, hint, self.max_image_pixels), **sample}


def collate_captions(batch: list[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad tokens (and labels with IGNORE_INDEX) to the longest sample; concatenate all images along dim 0
    (the model fills placeholders in order, so samples may hold different numbers of images); text-only
    samples (no ``images``) give a batch without ``images``. ``padding_mask`` is True on real tokens.
    Generation uses left padding."""
    length = max(len(b["tokens"]) for b in batch)
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    padding_mask = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, b in enumerate(batch):
        n = len(b["tokens"])
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        tokens[row, span] = torch.tensor(b["tokens"])
        padding_mask[row, span] = True
        if "labels" in b:
            labels[row, span] = torch.tensor(b["labels"])
    out = {"ids": [b["id"] for b in batch], "tokens": tokens, "padding_mask": padding_mask}
    if "images" in batch[0]:
        out["images"] = torch.cat([b["images"] for b in batch])
    if "labels" in batch[0]:
        out["labels"] = labels
    return out


def count_truncated(dataset: CaptionDataset, samples: list[dict[str, Any]] | None = None) -> int:
    """How many samples (``dataset``'s, or ``samples`` of it) had their caption cut to fit ``max_seq_len``
    (tokenises each once)."""
    return sum(dataset.tokenize(s)["truncated"] for s in (dataset.samples if samples is None else samples)
               if isinstance(s["caption"], str))


