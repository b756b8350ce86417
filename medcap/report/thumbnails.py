"""Thumbnails for the report page: small JPEGs, inlined as data URIs while their total stays under a limit (the
page is then one file), otherwise written into a folder beside the page and linked by relative URL."""

import base64
import io
import os
import shutil
from pathlib import Path
from urllib.parse import quote

from medcap.atomic import replaced_atomically
from medcap.data.images import ImageLoadError, load_image


def jpeg_thumbnail(path: str | Path, size: int, quality: int = 80) -> bytes:
    """The image (any format ``load_image`` reads, DICOM included) shrunk to fit ``size`` x ``size``, as JPEG."""
    image = load_image(str(path))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def relative_url(target: str | Path, page_dir: Path) -> str:
    """A URL for ``target`` relative to the page's folder, percent-encoded (spaces, ``#``, ``%``...). Links are
    not resolved: a browser resolves the URL against the folder the page was opened by, a symlink included."""
    target = Path(os.path.abspath(target))
    try:
        relative = os.path.relpath(target, os.path.abspath(page_dir))
    except ValueError:  # another drive (Windows): an absolute file URL
        return target.as_uri()
    return quote(Path(relative).as_posix())


def thumbnails_folder(page: Path) -> Path:
    """Where a page's thumbnails go when they are not inlined: ``<page stem>_thumbs/`` beside it."""
    return page.with_name(f"{page.stem}_thumbs")


def thumbnail_sources(paths: list[str], page: Path, size: int, inline_kb: float
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """({image path: img src}, {image path: why it has no thumbnail}) for each distinct path. The thumbnails
    are data URIs when they total at most ``inline_kb`` KiB, else JPEG files in ``<page stem>_thumbs/`` (that
    folder is replaced; it goes away when nothing is written to it)."""
    folder = thumbnails_folder(page)
    jpegs, problems = {}, {}
    for path in dict.fromkeys(paths):
        try:
            jpegs[path] = jpeg_thumbnail(path, size)
        except (ImageLoadError, OSError, ValueError) as e:
            problems[path] = f"no thumbnail: {e}"
    if sum(map(len, jpegs.values())) <= inline_kb * 1024:
        shutil.rmtree(folder, ignore_errors=True)
        return {p: "data:image/jpeg;base64," + base64.b64encode(j).decode("ascii") for p, j in jpegs.items()}, problems
    sources = {}
    with replaced_atomically(folder, folder=True) as tmp:
        for number, (path, jpeg) in enumerate(jpegs.items()):
            name = f"{number:06d}.jpg"
            (tmp / name).write_bytes(jpeg)
            sources[path] = quote(f"{folder.name}/{name}")
    return sources, problems
