"""Opening images: ordinary files with PIL, DICOM with pydicom, NIfTI volumes with nibabel; always returned as
8-bit RGB PIL images, downscaled on load to at most ``max_pixels`` pixels."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps

if TYPE_CHECKING:
    import pydicom

# CT window (centre, width) in Hounsfield units for files that carry none: a soft-tissue window.
DEFAULT_CT_WINDOW = (40.0, 400.0)
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIFTI_PERCENTILES = (0.5, 99.5)
# Decoded images larger than this are downscaled on load (aspect ratio kept): 16.8 MP, 48 MiB as 8-bit RGB, far
# above any encoder's input, far below what an image just under PIL's own limit takes (13000 x 13000: ~0.5 GB
# as RGB, several GB through the float conversions of 16-bit images).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class ImageLoadError(ValueError):
    """An image file that is missing, empty or unreadable; the message names the file."""


def is_dicom(path: Path) -> bool:
    """By suffix, or by the ``DICM`` marker that follows the 128-byte preamble of a DICOM file."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def to_unit_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Maps ``low`` to 0 and ``high`` to 1, linear in between, clipped outside."""
    return np.clip((values.astype(np.float64) - low) / max(high - low, 1e-9), 0.0, 1.0)


def unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 255).astype(np.uint8)


def _first(value) -> float:
    """WindowCenter / WindowWidth may hold several windows; the first is the default one."""
    return float(value[0]) if isinstance(value, Sequence) else float(value)


def dicom_to_uint8(ds: "pydicom.Dataset", window: tuple[float, float] | None = None) -> np.ndarray:
    """The pixels of a pydicom Dataset as 8 bits: ``[H, W]`` for grayscale, ``[H, W, 3]`` for colour.

    The 8-bit conversion:
    - multi-frame images give their middle frame;
    - grayscale stored values go through RescaleSlope and RescaleIntercept (Hounsfield units for CT);
    - CT is windowed: ``window`` = (centre, width) if given, else the file's first WindowCenter/WindowWidth,
      else 40/400 HU (soft tissue); values below centre - width/2 become 0, above centre + width/2 become 255,
      linear in between;
    - other grayscale images are scaled linearly from their actual minimum (0) to maximum (255);
    - MONOCHROME1 (where high values are displayed dark) is inverted after scaling, so that dense tissue is
      bright as in MONOCHROME2;
    - colour: pydicom already returns YBR as RGB; PALETTE COLOR goes through its lookup table; colour data
      wider than 8 bits is scaled by its actual range.
    """
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.dtype == np.uint8:
            return pixels
        return unit_to_uint8(to_unit_range(pixels, pixels.min(), pixels.max()))

    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if ds.get("Modality") == "CT":
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        centre, width = window or DEFAULT_CT_WINDOW
        unit = to_unit_range(values, centre - width / 2, centre + width / 2)
    else:
        unit = to_unit_range(values, values.min(), values.max())
    return unit_to_uint8(1 - unit if photometric == "MONOCHROME1" else unit)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_to_uint8(volume: np.ndarray) -> np.ndarray:
    """The middle axial slice of a NIfTI volume in RAS+ orientation (``nibabel.as_closest_canonical``), as 8 bits.

    The 8-bit conversion:
    - the slice is ``volume[:, :, depth // 2]`` (the third RAS+ axis runs from inferior to superior); a 4-D
      volume gives its first volume (``[..., 0]``, e.g. the b=0 image of a diffusion series) first; a 2-D image
      is its own slice;
    - it is shown as radiologists view axial images: anterior at the top, the patient's right on the image's
      left;
    - intensities are windowed to the slice's 0.5th and 99.5th percentiles (NaNs ignored): the 0.5th
      percentile and below become 0, the 99.5th and above 255, linear in between; NaNs become 0. A constant
      slice becomes 0.
    """
    if volume.ndim == 4:
        volume = volume[..., 0]
    if volume.ndim == 3:
        volume = volume[:, :, volume.shape[2] // 2]
    if volume.ndim != 2:
        raise ValueError(f"expected a 2-D, 3-D or 4-D NIfTI image, got shape {volume.shape}")
    # array axes are (x: left -> right, y: posterior -> anterior); rows must run anterior -> posterior and
    # columns from the patient's right to left
    image = volume[::-1, ::-1].T.astype(np.float64)
    finite = image[np.isfinite(image)]
    low, high = np.percentile(finite, NIFTI_PERCENTILES) if finite.size else (0.0, 0.0)
    return unit_to_uint8(to_unit_range(np.nan_to_num(image, nan=low, posinf=high, neginf=low), low, high))


def _open_nifti(path: Path) -> Image.Image:
    import nibabel

    volume = nibabel.as_closest_canonical(nibabel.load(path))
    return Image.fromarray(np.ascontiguousarray(nifti_to_uint8(np.asanyarray(volume.dataobj))))


def capped_size(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """``size`` (width, height) scaled down, aspect ratio kept, to at most ``max_pixels`` pixels; ``size`` itself
    when it fits or ``max_pixels`` is None."""
    width, height = size
    if not max_pixels or width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _downscaled(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # reducing_gap: an integer box reduction first, then the bicubic filter (PIL's resize antialiases)
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _open_with_pil(path: Path, max_pixels: int | None) -> tuple[Image.Image, tuple[int, int]]:
    with Image.open(path) as opened:
        original = opened.size
        target = capped_size(original, max_pixels)
        if target != original and opened.format == "JPEG":
            opened.draft(None, target)  # the decoder scales by 1/2, 1/4 or 1/8: the full image is never decoded
        opened.load()
        upright = opened
        if opened.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # a photo taken with the camera turned
            upright = ImageOps.exif_transpose(opened)  # a new image
            if upright.size != opened.size:
                original, target = original[::-1], target[::-1]
        if target == upright.size:
            image = upright.copy() if upright is opened else upright
        elif upright.mode in ("P", "PA", "1"):  # resampling would take the nearest palette entry / bit
            image = _downscaled(upright.convert("L" if upright.mode == "1" else "RGBA"), target)
        else:
            image = _downscaled(upright, target)  # before any conversion: 16-bit stays 2 bytes a pixel
    if image.mode in HIGH_BIT_DEPTH_MODES:  # 16-bit / 32-bit grayscale: scale by the finite range, NaN -> 0
        array = np.asarray(image, dtype=np.float64)
        finite = array[np.isfinite(array)]
        if not finite.size:
            raise ValueError("no finite pixel value (all NaN or infinite)")
        low, high = finite.min(), finite.max()
        array = np.nan_to_num(array, nan=low, posinf=high, neginf=low)
        image = Image.fromarray(unit_to_uint8(to_unit_range(array, low, high)))
    return image, original


def open_image(path: str | Path, window: tuple[float, float] | None = None,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """``load_image``'s RGB image and the (width, height) the file holds before any downscaling (upright: turned
    as its EXIF orientation says)."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"image file is empty (0 bytes): {path}")
    try:
        if is_nifti(path) or is_dicom(path):  # decoded whole by their readers; downscaled once 8-bit
            if is_nifti(path):
                image = _open_nifti(path)
            else:
                import pydicom

                image = Image.fromarray(dicom_to_uint8(pydicom.dcmread(path), window))
            original = image.size
            image = _downscaled(image, capped_size(original, max_pixels))
        else:
            image, original = _open_with_pil(path, max_pixels)
    except Exception as e:  # PIL and pydicom raise many error types on broken files; all mean "unreadable"
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background, original
    return (image if image.mode == "RGB" else image.convert("RGB")), original


def load_image(path: str | Path, window: tuple[float, float] | None = None,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from any file PIL can read, from a DICOM file (chosen by the ``.dcm``/``.dicom`` suffix
    or the ``DICM`` marker) or from a NIfTI file (``.nii``/``.nii.gz``: its middle axial slice, see
    ``nifti_to_uint8``). Photos are turned upright as their EXIF orientation says (``PIL.ImageOps.exif_transpose``).
    Grayscale, palette, CMYK, 16-bit and 32-bit images are converted (16-bit and 32-bit scaled by their actual
    range of finite values; NaN and -inf become 0, +inf 255; an image without a finite value raises); transparent
    images are composited onto black. ``window`` = (centre, width) in HU overrides the window of CT DICOMs (see
    ``dicom_to_uint8``). An image of more than ``max_pixels`` pixels (None: no limit) is downscaled to fit, aspect
    ratio kept (``capped_size``): JPEG files are decoded at 1/2, 1/4 or 1/8 scale directly (never whole), other
    files are downscaled right after decoding, before any conversion. Raises ``ImageLoadError`` naming the file."""
    return open_image(path, window, max_pixels)[0]
