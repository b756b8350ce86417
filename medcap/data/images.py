"""Opening images: ordinary files with PIL, DICOM with pydicom; always returned as 8-bit RGB PIL images."""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Default CT window (centre, width) in Hounsfield units when the file has none: a soft-tissue window.
DEFAULT_CT_WINDOW = (40.0, 400.0)


class ImageLoadError(ValueError):
    pass


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _first(value) -> float:
    """DICOM window values may be multi-valued; take the first."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def dicom_to_uint8(ds, window: tuple[float, float] | None = None) -> np.ndarray:
    """DICOM pixels as an 8-bit array ([H, W] grayscale or [H, W, 3] colour).

    Conversion to 8 bit: stored values go through RescaleSlope/RescaleIntercept (Hounsfield units for CT);
    CT is then windowed (``window`` = (centre, width), else the file's first WindowCenter/WindowWidth, else
    a soft-tissue window 40/400 HU) and clipped; other grayscale images are scaled linearly from their 0.5th
    to their 99.5th percentile (robust to a few extreme pixels such as burnt-in markers) and clipped. MONOCHROME1 (where high values are dark) is inverted so that dense tissue is bright. Multi-frame
    images give their middle frame. Colour images are converted to RGB by pydicom.
    """
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if frames > 1:
        pixels = pixels[frames // 2]
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        from pydicom.pixels import convert_color_space

        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        if pixels.dtype != np.uint8:
            pixels = pixels.astype(np.float64)
            pixels = (pixels - pixels.min()) / max(pixels.max() - pixels.min(), 1e-9) * 255
        return pixels.astype(np.uint8)
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if ds.get("Modality") == "CT":
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        centre, width = window or DEFAULT_CT_WINDOW
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = np.percentile(values, [0.5, 99.5])
    scaled = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
    if photometric == "MONOCHROME1":
        scaled = 1 - scaled
    return np.round(scaled * 255).astype(np.uint8)


def load_image(path: str | Path, window: tuple[float, float] | None = None) -> Image.Image:
    """An RGB image from any PIL-readable file or a DICOM file. Grayscale, palette, RGBA, CMYK and 16-bit
    images are converted (16-bit scaled by their actual range); ``window`` applies to CT DICOMs."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"image file is empty (0 bytes): {path}")
    try:
        if is_dicom(path):
            import pydicom

            array = dicom_to_uint8(pydicom.dcmread(path), window)
            image = Image.fromarray(array)
        else:
            with Image.open(path) as opened:
                opened.load()
                image = opened
                if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    array = np.asarray(image, dtype=np.float64)
                    low, high = array.min(), array.max()
                    image = Image.fromarray(np.round((array - low) / max(high - low, 1e-9) * 255).astype(np.uint8))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageLoadError(f"cannot read image {path}: {e}") from None
    except Exception as e:  # pydicom raises a variety of errors on broken files
        if isinstance(e, ImageLoadError):
            raise
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if image.mode == "RGBA" or image.mode == "LA" or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        return background
    return image.convert("RGB")
