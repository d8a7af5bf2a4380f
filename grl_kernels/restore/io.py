"""Reading and writing images for ``grl-kernels restore``: PNG, JPEG, TIFF, WebP; 8 and 16 bits;
gray, gray+alpha, RGB, RGBA (palette, CMYK and YCbCr files are read as RGB/RGBA).

Pixels come back as float32 numpy arrays in [0, 1], (H, W, C) with C = 1 or 3, and the alpha
channel apart (H, W) or None. Pillow reads and writes everything except 16-bit colour, which
Pillow cannot hold: 16-bit colour PNGs go through pypng and 16-bit colour TIFFs through tifffile.
Files are written to a temporary name in the output folder and renamed, so an interrupted or
failed write never leaves a partial file under the final name.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}


class ImageError(ValueError):
    """A file that cannot be read or written as an image (the message names the problem)."""


@dataclass
class Picture:
    pixels: np.ndarray  # (H, W, 1 or 3) float32 in [0, 1]
    alpha: Optional[np.ndarray]  # (H, W) float32 in [0, 1], or None
    bits: int  # 8 or 16
    format: str  # PNG, JPEG, TIFF, WEBP

    @property
    def gray(self) -> bool:
        return self.pixels.shape[2] == 1


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise ImageError("reading images needs Pillow (pip install pillow)") from exc
    return Image


def image_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ImageError(f"unsupported file type {ext or '(none)'!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[ext]


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in FORMATS


def _rawmode(im) -> str:
    tile = getattr(im, "tile", None) or []
    if not tile:
        return ""
    args = getattr(tile[0], "args", None)
    if args is None:
        args = tile[0][3]
    return args if isinstance(args, str) else str(args[0]) if args else ""


def _split(a: np.ndarray, scale: float, alpha: bool):
    a = a.astype(np.float32) / scale
    if a.ndim == 2:
        a = a[:, :, None]
    if alpha:
        return np.ascontiguousarray(a[:, :, :-1]), np.ascontiguousarray(a[:, :, -1])
    return np.ascontiguousarray(a), None


def _read_png16(path: str) -> Picture:
    try:
        import png
    except ImportError as exc:
        raise ImageError("16-bit colour PNG needs pypng (pip install pypng)") from exc
    w, h, rows, meta = png.Reader(filename=path).asDirect()
    planes = meta["planes"]
    a = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, planes)
    px, al = _split(a, (1 << meta["bitdepth"]) - 1, meta["alpha"])
    return Picture(px, al, 16 if meta["bitdepth"] > 8 else 8, "PNG")


def _read_tiff16(path: str) -> Picture:
    try:
        import tifffile
    except ImportError as exc:
        raise ImageError("16-bit colour TIFF needs tifffile (pip install tifffile)") from exc
    a = tifffile.imread(path)
    if a.dtype != np.uint16 or a.ndim != 3 or a.shape[2] not in (2, 3, 4):
        raise ImageError(f"unsupported TIFF layout {a.shape} {a.dtype}; expected 16-bit gray+alpha, RGB or RGBA")
    px, al = _split(a, 65535.0, a.shape[2] in (2, 4))
    return Picture(px, al, 16, "TIFF")


def read_image(path: str) -> Picture:
    """Read ``path``; :class:`ImageError` if it is not a readable image of a supported kind."""
    fmt = image_format(path)
    Image = _pil()
    try:
        im = Image.open(path)
        raw = _rawmode(im)
        if im.mode in ("LA", "RGB", "RGBA") and ";16" in raw:
            im.close()
            return _read_png16(path) if fmt == "PNG" else _read_tiff16(path)
        im.load()
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ImageError(f"cannot read image ({type(exc).__name__}: {exc})") from None
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode == "1":
        im = im.convert("L")
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return Picture(*_split(np.asarray(im), 255.0, mode.endswith("A")), 8, fmt)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"unsupported 32-bit integer image (values outside 0..65535)")
        return Picture(*_split(a, 65535.0, False), 16, fmt)
    raise ImageError(f"unsupported image mode {mode!r} (expected 8/16-bit gray, RGB or RGBA)")


def _quantize(a: np.ndarray, bits: int) -> np.ndarray:
    top = 255 if bits == 8 else 65535
    q = np.rint(np.clip(a, 0.0, 1.0) * top)
    return q.astype(np.uint8 if bits == 8 else np.uint16)


def _save(path: str, pic: Picture) -> None:
    Image = _pil()
    a = pic.pixels if pic.alpha is None else np.concatenate([pic.pixels, pic.alpha[:, :, None]], axis=2)
    q = _quantize(a, pic.bits)
    channels = q.shape[2]
    fmt = pic.format
    if pic.bits == 8 or fmt in ("JPEG", "WEBP"):
        if pic.bits != 8:
            q = _quantize(a, 8)
        if fmt == "JPEG" and channels in (2, 4):  # JPEG has no alpha
            q = q[:, :, :-1]
            channels -= 1
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
        im = Image.fromarray(q[:, :, 0] if channels == 1 else q, mode=mode)
        kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        im.save(path, format=fmt, **kw)
        return
    if channels == 1:
        Image.fromarray(q[:, :, 0].astype(np.uint16)).save(path, format=fmt)
        return
    if fmt == "PNG":
        import png

        h, w, c = q.shape
        with open(path, "wb") as f:
            png.Writer(w, h, greyscale=c <= 2, alpha=c in (2, 4), bitdepth=16).write(f, q.reshape(h, w * c))
        return
    import tifffile

    tifffile.imwrite(path, q, photometric="minisblack" if channels == 2 else "rgb",
                     extrasamples=("unassalpha",) if channels in (2, 4) else None)


def write_image(path: str, pic: Picture) -> None:
    """Write atomically: to a temporary file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".partial{ext}", dir=folder)
    os.close(fd)
    try:
        _save(tmp, pic)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
