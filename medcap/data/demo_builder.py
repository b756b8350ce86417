"""The embedded demo data: real medical images shipped in PyPI packages, lightly augmented, with
semi-synthetic findings drawn onto them and captions that state the modality, the finding and its location.

    python -m medcap.data.demo_builder --out datasets/demo --seed 0

Deterministic given the seed. See datasets/README.md for the data card.
"""

import argparse
import json
import shutil
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

from medcap.data.findings import caption_for
from medcap.data.images import load_image

SIZE = 256
ZONES = {"right upper zone": (0.32, 0.33), "right lower zone": (0.30, 0.62),
         "left upper zone": (0.68, 0.33), "left lower zone": (0.70, 0.62)}  # patient's right = image left
QUADRANTS = {"upper left quadrant": (0.30, 0.30), "upper right quadrant": (0.70, 0.30),
             "lower left quadrant": (0.30, 0.70), "lower right quadrant": (0.70, 0.70)}
HEAD = {"right frontal region": (0.38, 0.32), "left frontal region": (0.62, 0.32),
        "right occipital region": (0.38, 0.68), "left occipital region": (0.62, 0.68)}
# the same quadrant names, placed inside the body / the scanned tissue band of these images
INNER_QUADRANTS = {"upper left quadrant": (0.34, 0.43), "upper right quadrant": (0.66, 0.43),
                   "lower left quadrant": (0.34, 0.62), "lower right quadrant": (0.66, 0.62)}
TIBIA = {"proximal tibial shaft": (0.42, 0.22), "mid tibial shaft": (0.42, 0.45),
         "distal tibial shaft": (0.42, 0.68)}

# modality -> (source, finding types, locations)
BASES = {
    "chest_xray": ("pydicom-data:RG1_UNCR.dcm", ("nodule", "opacity"), ZONES),
    "leg_xray": ("pydicom-data:RG3_UNCR.dcm", ("fracture",), TIBIA),
    "head_ct": ("pydicom-data:693_UNCR.dcm", ("lesion",), HEAD),
    "shoulder_mr": ("pydicom-data:MR2_UNCR.dcm", ("lesion",), QUADRANTS),
    "abdomen_mr": ("pydicom-data:MR-SIEMENS-DICOM-WithOverlays.dcm", ("lesion",), INNER_QUADRANTS),
    "ultrasound": ("pydicom-data:US1_UNCR.dcm", ("lesion",), INNER_QUADRANTS),
    "fundus": ("scikit-image:retina", ("dark_lesion",), QUADRANTS),
    "histology": ("scikit-image:immunohistochemistry", ("dark_lesion",), QUADRANTS),
}
P_NORMAL = 0.3
VERSION = 5  # bump when the output changes, so that older builds are rebuilt


def load_base(source: str) -> Image.Image:
    """A base image from an installed package (never downloaded), at SIZE x SIZE RGB."""
    package, name = source.split(":")
    if package == "scikit-image":
        import skimage.data

        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    else:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name, download=False)
        if path is None:
            raise FileNotFoundError(f"{name} not found: install pydicom-data (make install does)")
        image = load_image(path)
    return image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def darken(image: Image.Image, gamma: float) -> Image.Image:
    """A gamma curve: this radiograph's lung fields are light grey, which hides drawn opacities."""
    return Image.fromarray((255 * (np.asarray(image) / 255.0) ** gamma).astype(np.uint8))


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Small rotation, scale and shift, brightness and contrast; never a flip (left/right matters)."""
    angle = np.deg2rad(rng.uniform(-4, 4))
    scale = rng.uniform(0.94, 1.06)
    shift = rng.uniform(-0.04, 0.04, size=2) * SIZE
    # inverse map (output -> input pixel) of: scale and rotate about the centre, then shift
    cos, sin, c = np.cos(angle) / scale, np.sin(angle) / scale, SIZE / 2
    a, b, d, e = cos, sin, -sin, cos
    ox, oy = c + shift[0], c + shift[1]
    image = image.transform((SIZE, SIZE), Image.Transform.AFFINE,
                            (a, b, c - a * ox - b * oy, d, e, c - d * ox - e * oy), Image.Resampling.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.9, 1.1))


def finding_mask(kind: str, centre: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A soft [0, 1] mask of the finding's shape at ``centre`` (fractions of the image size)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    cx, cy = (np.array(centre) * SIZE + rng.uniform(-6, 6, size=2))
    if kind == "fracture":
        slope = rng.uniform(-0.25, 0.25)
        distance = np.abs((yy - cy) - slope * (xx - cx)) / np.sqrt(1 + slope**2)
        return np.clip(3.5 - distance, 0, 1) * (np.abs(xx - cx) < 0.16 * SIZE)
    if kind == "opacity":
        sigma = rng.uniform(20, 24)
        return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    radius = rng.uniform(16, 20)
    return np.clip(radius + 1 - np.hypot(xx - cx, yy - cy), 0, 1)


def draw(image: Image.Image, kind: str, centre: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    mask = finding_mask(kind, centre, rng)[..., None]
    if kind in ("nodule", "opacity", "lesion"):
        strength = 0.75 if kind == "opacity" else 0.85
        pixels = pixels + (235 - pixels) * mask * strength  # bright (dense / hyperintense)
    else:
        pixels = pixels * (1 - 0.85 * mask)  # dark (lucent / hypointense / haemorrhagic)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 3, size=(SIZE, SIZE, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def finding_plan(n: int, kinds: tuple[str, ...], locations: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(finding, location) for the ``n`` samples of one base image in one split: round(P_NORMAL * n) normal,
    the others cycling through every finding type x location pair (each cycle in a new random order), so
    that finding types and locations stay balanced; returned in random order."""
    n_normal = round(P_NORMAL * n)
    pairs = [(kind, location) for kind in kinds for location in locations]
    abnormal = []
    while len(abnormal) < n - n_normal:
        abnormal += [pairs[i] for i in rng.permutation(len(pairs))]
    plan = [("none", "none")] * n_normal + abnormal[: n - n_normal]
    return [plan[i] for i in rng.permutation(n)]


def make_sample(base: Image.Image, modality: str, finding: str, location: str,
                rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """One sample: the base image augmented, the finding drawn (unless "none"), noise; and its labels."""
    image = augment(base, rng)
    if finding != "none":
        image = draw(image, finding, BASES[modality][2][location], rng)
    image = add_noise(image, rng)
    return image, {"caption": caption_for(modality, finding, location), "modality": modality,
                   "finding": finding, "location": location}


@cache
def base_images() -> dict[str, Image.Image]:
    """The base image of each modality at SIZE x SIZE (loaded once per process; never modified)."""
    bases = {modality: load_base(source) for modality, (source, _, _) in BASES.items()}
    bases["chest_xray"] = darken(bases["chest_xray"], 2.5)
    return bases


def build_demo(out_dir: str | Path, seed: int = 0, n_train: int = 512, n_val: int = 64, n_test: int = 96) -> dict:
    """Write ``images/<id>.png`` and ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` into ``out_dir``; returns the
    counts per split. Sample i of a split uses base image i mod 8. Does nothing if ``out_dir`` already holds
    a build with the same parameters."""
    out_dir = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if n < len(BASES):
            raise ValueError(f"n_{split}={n}: each split needs at least {len(BASES)} samples, one per base image")
    info = {"seed": seed, "counts": counts, "version": VERSION}
    info_file = out_dir / "build_info.json"
    manifests = [out_dir / f"{split}.jsonl" for split in counts]
    if info_file.is_file() and json.loads(info_file.read_text()) == info and all(m.is_file() for m in manifests):
        print(f"demo data already built in {out_dir} (seed {seed}, {counts})")
        return counts
    if info_file.is_file():  # an earlier build with other parameters: drop its images and the questions on them
        info_file.unlink()
        shutil.rmtree(out_dir / "images", ignore_errors=True)
        if (out_dir / "QA_information").is_dir():
            shutil.rmtree(out_dir / "QA_information")
            print(f"removed the earlier build's VQA questions; `python -m medcap.data.demo_vqa --data {out_dir}` "
                  f"writes this build's")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    bases = base_images()
    modalities = list(BASES)
    rng = np.random.default_rng(seed)
    summary = {split: Counter() for split in counts}
    with tqdm(total=sum(counts.values()), desc="demo data", unit="image") as progress:
        for split, n in counts.items():
            plans = {m: finding_plan(len(range(j, n, len(modalities))), BASES[m][1], BASES[m][2], rng)
                     for j, m in enumerate(modalities)}  # modality j has the samples j, j + 8, j + 16, ...
            lines = []
            for i in range(n):
                modality = modalities[i % len(modalities)]  # every base image in every split, balanced
                finding, location = plans[modality][i // len(modalities)]
                image, record = make_sample(bases[modality], modality, finding, location, rng)
                summary[split][finding] += 1
                sample_id = f"demo_{split}_{i:04d}"
                image.save(out_dir / "images" / f"{sample_id}.png")
                lines.append(json.dumps({"id": sample_id, "image": f"images/{sample_id}.png", **record}))
                progress.update()
            (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    info_file.write_text(json.dumps(info))
    print(f"demo data in {out_dir}:")
    for split, findings in summary.items():
        print(f"  {split}: {counts[split]} samples ({', '.join(f'{k} {v}' for k, v in sorted(findings.items()))})")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="datasets/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=96)
    args = parser.parse_args()
    build_demo(args.out, args.seed, args.n_train, args.n_val, args.n_test)


if __name__ == "__main__":
    main()
