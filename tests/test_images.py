import numpy as np
import pytest
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medcap.data.images import ImageLoadError, load_image, open_image


def save_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", modality="OT", **tags):
    """A minimal uncompressed 16-bit grayscale DICOM file; ``pixels`` is [H, W] or [frames, H, W]."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def red(path, **kwargs) -> list:
    """The red channel of the loaded image as nested lists (grayscale images have R = G = B)."""
    image = load_image(path, **kwargs)
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0].tolist()


def test_8bit_grayscale_becomes_gray_rgb(tmp_path):
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L").save(tmp_path / "l.png")
    assert red(tmp_path / "l.png") == [[0, 100], [200, 255]]


def test_rgba_is_composited_onto_black(tmp_path):
    Image.new("RGBA", (3, 2), (200, 100, 50, 128)).save(tmp_path / "rgba.png")
    Image.new("RGBA", (3, 2), (200, 100, 50, 255)).save(tmp_path / "opaque.png")
    assert load_image(tmp_path / "opaque.png").getpixel((0, 0)) == (200, 100, 50)
    assert load_image(tmp_path / "rgba.png").getpixel((2, 1)) == (100, 50, 25)  # x * 128/255


def test_16bit_is_scaled_by_its_actual_range(tmp_path):
    # range 1000..5000 -> 0..255: 2000 -> 63.75, 4200 -> 204
    Image.fromarray(np.array([[1000, 2000], [4200, 5000]], dtype=np.uint16)).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert red(tmp_path / "i16.png") == [[0, 64], [204, 255]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path, orientation):
    """A camera photo stored 60 x 30 with EXIF orientation 1-8 loads as PIL's exif_transpose shows it (5-8 as
    30 x 60), also when downscaled on load; the reported size is the upright one."""
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray((rng.random((30, 60, 3)) * 255).astype(np.uint8)).resize((600, 300))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as opened:
        upright = ImageOps.exif_transpose(opened)
    assert upright.size == ((300, 600) if orientation >= 5 else (600, 300))
    image, size = open_image(path)
    assert size == image.size == upright.size
    assert np.array_equal(np.asarray(image), np.asarray(upright))
    small, size = open_image(path, max_pixels=600 * 300 // 4)  # JPEG draft at 1/2 scale: 300 x 150 stored
    assert size == upright.size and small.size == (upright.width // 2, upright.height // 2)
    expected = np.asarray(upright.resize(small.size, Image.Resampling.BICUBIC), dtype=np.int16)
    assert np.abs(np.asarray(small, dtype=np.int16) - expected).mean() < 4  # the same picture, the same way up


def test_float_images_with_nan_are_scaled_by_their_finite_values(tmp_path):
    values = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, -np.inf
    Image.fromarray(values).save(tmp_path / "nan.tiff")
    assert Image.open(tmp_path / "nan.tiff").mode == "F"
    wide = values.astype(np.float64)
    low, high = wide[np.isfinite(wide)].min(), wide[np.isfinite(wide)].max()
    expected = np.round((np.nan_to_num(wide, nan=low, posinf=high, neginf=low) - low) / (high - low) * 255)
    assert red(tmp_path / "nan.tiff") == expected.astype(int).tolist()
    assert red(tmp_path / "nan.tiff")[0][:3] == [0, 255, 0]  # NaN and -inf black, +inf white
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)).save(tmp_path / "all_nan.tiff")
    with pytest.raises(ImageLoadError, match="all_nan.tiff: ValueError: no finite pixel value"):
        load_image(tmp_path / "all_nan.tiff")


def test_palette_and_cmyk_become_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((3, 3)) == (10, 200, 30)
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    cyan = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(cyan - [0, 255, 255]).max() <= 3  # full cyan ink, no magenta/yellow: G and B only


def test_monochrome1_is_inverted_after_min_max_scaling(tmp_path):
    # range 100..500 -> 0..255 (200 -> 63.75, 420 -> 204), then inverted: the highest value is black
    pixels = np.array([[100, 200], [420, 500]])
    assert red(save_dicom(tmp_path / "m2.dcm", pixels)) == [[0, 64], [204, 255]]
    assert red(save_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")) == [[255, 191], [51, 0]]


def test_ct_rescale_and_window(tmp_path):
    # stored = HU + 1024; window 40/400 maps [-160, 240] HU to [0, 255]:
    # 0 HU -> 160/400*255 = 102, 100 HU -> 260/400*255 = 165.75, -1000 and 1000 HU are clipped
    hu = np.array([[-1000, 0], [100, 1000]])
    path = save_dicom(tmp_path / "ct.dcm", hu + 1024, modality="CT", RescaleIntercept=-1024, RescaleSlope=1,
                      WindowCenter=40, WindowWidth=400)
    assert red(path) == [[0, 102], [166, 255]]
    # override 40/80 maps [0, 80] HU: 0 -> 0, 100 -> 255
    assert red(path, window=(40, 80)) == [[0, 0], [255, 255]]
    # the first of several windows in the file is used; 50/100 maps [0, 100] HU: 0 -> 0, 20 -> 51, 60 -> 153
    hu = np.array([[0, 20], [60, 100]])
    path = save_dicom(tmp_path / "ct2.dcm", hu + 1024, modality="CT", RescaleIntercept=-1024, RescaleSlope=1,
                      WindowCenter=[50, 300], WindowWidth=[100, 1500])
    assert red(path) == [[0, 51], [153, 255]]


def test_ct_without_window_uses_the_soft_tissue_default_and_the_slope(tmp_path):
    # HU = 2 * stored - 100: stored 50 -> 0 HU -> 102 (window 40/400); stored 130 -> 160 HU -> 204
    path = save_dicom(tmp_path / "ct.dcm", np.array([[50, 130]]), modality="CT", RescaleIntercept=-100,
                      RescaleSlope=2)
    assert red(path) == [[102, 204]]


def test_dicom_found_by_magic_and_multiframe_gives_the_middle_frame(tmp_path):
    frames = np.array([[[0, 10]], [[7, 3]], [[10, 0]]])  # middle frame: 3..7 -> 7 -> 255, 3 -> 0
    path = save_dicom(tmp_path / "scan.bin", frames)
    assert red(path) == [[255, 0]]


def test_ybr_colour_dicom_is_not_converted_twice():
    # pydicom's test file is a red square stored as YBR_FULL_422; pydicom already returns it as RGB
    image = load_image(get_testdata_file("SC_ybr_full_422_uncompressed.dcm", download=False))
    assert image.getpixel((0, 0)) == (254, 0, 0)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "empty \\(0 bytes\\)"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20), "cannot read image"),
])
def test_bad_files_raise_naming_the_path(tmp_path, make, message):
    path = tmp_path / "scan.png"
    make(path)
    with pytest.raises(ImageLoadError, match=f"{message}.*scan.png"):
        load_image(path)


def test_truncated_png_and_broken_dicom_raise(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="cannot read image .*cut.png"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "broken.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ValueError, match="cannot read image .*broken.dcm"):  # ImageLoadError is a ValueError
        load_image(tmp_path / "broken.dcm")


def save_nifti(path, volume: np.ndarray, affine=None):
    import nibabel

    nibabel.save(nibabel.Nifti1Image(volume.astype(np.float32), np.eye(4) if affine is None else affine), path)
    return path


def test_nifti_gives_the_middle_axial_slice_in_radiological_orientation(tmp_path):
    # RAS+ volume x (left -> right) 4, y (posterior -> anterior) 3, z 3; only the middle slice z = 1 varies
    x, y = np.meshgrid(np.arange(4), np.arange(3), indexing="ij")
    volume = np.full((4, 3, 3), 50.0)
    volume[:, :, 1] = 10 * x + y
    image = np.asarray(load_image(save_nifti(tmp_path / "ct.nii.gz", volume)))[..., 0]
    assert image.shape == (3, 4)  # rows: y, columns: x
    # anterior (high y) at the top, the patient's right (high x) on the left: the brightest voxel x=3, y=2
    # is at the top left, the darkest x=0, y=0 at the bottom right
    assert image[0, 0] == 255 and image[2, 3] == 0
    assert (np.diff(image.astype(int), axis=1) < 0).all() and (np.diff(image.astype(int), axis=0) < 0).all()
    # the same patient stored left-right flipped (x runs right -> left) reads the same once reoriented
    flipped = save_nifti(tmp_path / "flipped.nii", volume[::-1], affine=np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert (np.asarray(load_image(flipped))[..., 0] == image).all()
    # 4-D: the first volume
    series = np.stack([volume, np.zeros_like(volume)], axis=-1)
    assert (np.asarray(load_image(save_nifti(tmp_path / "dwi.nii", series)))[..., 0] == image).all()


def test_nifti_is_windowed_to_the_percentiles_not_the_range(tmp_path):
    # 400 values 0..399 with 399 replaced by an outlier: p0.5 = 1.995, p99.5 = 397.005, so 200 maps to
    # (200 - 1.995) / 395.01 * 255 = 127.8 -> 128, where min-max scaling would crush it to 0
    values = np.arange(400, dtype=np.float64)
    values[399] = 1e6
    volume = values.reshape(20, 20, 1)
    image = np.asarray(load_image(save_nifti(tmp_path / "mr.nii", volume)))[..., 0]
    shown = image[::-1, ::-1].T.ravel()  # back to the volume's (x, y) order
    assert shown[200] == 128 and shown[0] == 0 and shown[1] == 0 and shown[399] == 255


def test_broken_nifti_raises_naming_the_path(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageLoadError, match="cannot read image .*scan.nii.gz"):
        load_image(tmp_path / "scan.nii.gz")
