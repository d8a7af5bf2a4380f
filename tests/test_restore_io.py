"""Image files for grl-kernels restore: every supported format, bit depth and channel layout
round-trips, and bad files give an ImageError naming the problem."""
import os

import numpy as np
import pytest

from grl_kernels.restore.io import ImageError, Picture, read_image, write_image

PIL = pytest.importorskip("PIL")

CASES = [  # (extension, bits, channels, alpha, lossless)
    (".png", 8, 3, False, True), (".png", 8, 1, False, True), (".png", 8, 3, True, True), (".png", 8, 1, True, True),
    (".png", 16, 1, False, True), (".png", 16, 3, False, True), (".png", 16, 3, True, True), (".png", 16, 1, True, True),
    (".tif", 8, 3, False, True), (".tiff", 16, 1, False, True), (".tif", 16, 3, False, True), (".tif", 16, 3, True, True),
    (".jpg", 8, 3, False, False), (".jpeg", 8, 1, False, False), (".webp", 8, 3, True, False),
]


@pytest.mark.parametrize("ext,bits,channels,alpha,lossless", CASES)
def test_round_trip(tmp_path, ext, bits, channels, alpha, lossless):
    rng = np.random.default_rng(0)
    top = (1 << bits) - 1
    # smooth content so that lossy formats stay close
    yy, xx = np.mgrid[0:24, 0:32] / 32.0
    px = np.stack([0.5 + 0.4 * np.sin(3 * yy + xx * (c + 1)) for c in range(channels)], axis=2).astype(np.float32)
    px = np.rint(px * top) / top
    al = (np.rint(rng.random((24, 32)) * top) / top).astype(np.float32) if alpha else None
    path = str(tmp_path / f"img{ext}")
    write_image(path, Picture(px, al, bits, {".tif": "TIFF", ".tiff": "TIFF"}.get(ext, ext[1:].upper().replace("JPG", "JPEG"))))
    back = read_image(path)
    assert back.bits == bits and back.pixels.shape == (24, 32, channels) and (back.alpha is None) == (not alpha)
    tol = 0.5 / top if lossless else 0.08
    assert np.abs(back.pixels - px).max() <= tol
    if alpha:
        assert np.abs(back.alpha - al).max() <= (0.5 / top if lossless else 0.08)
    assert [n for n in os.listdir(tmp_path) if n != f"img{ext}"] == []  # no temporary left behind
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)


def test_palette_and_bad_files(tmp_path):
    from PIL import Image

    Image.new("P", (8, 8)).save(tmp_path / "p.png")
    assert read_image(str(tmp_path / "p.png")).pixels.shape == (8, 8, 3)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="cannot read image"):
        read_image(str(tmp_path / "bad.png"))
    Image.new("RGB", (64, 64)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        read_image(str(tmp_path / "cut.png"))
    Image.new("F", (8, 8)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="unsupported image mode"):
        read_image(str(tmp_path / "f.tif"))
    with pytest.raises(ImageError, match="unsupported file type"):
        read_image(str(tmp_path / "x.bmp"))


def test_failed_write_leaves_nothing(tmp_path):
    bad = Picture(np.zeros((4, 4, 5), np.float32), None, 8, "PNG")  # five planes: not an image
    with pytest.raises(Exception):
        write_image(str(tmp_path / "o.png"), bad)
    assert os.listdir(tmp_path) == []
