"""diffattn.images.to_rgb: one 8-bit RGB reading of a file for every entry point (CLI, app,
DeContext's read_image), as a viewer shows it."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from diffattn.images import to_rgb

ORIENTATION = 0x0112


def gradient(w=6, h=4):
    """A small RGB image whose every pixel differs (so a rotation is visible)."""
    a = np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3) * 3
    return Image.fromarray(a, "RGB")


def test_exif_orientation_is_applied(tmp_path):
    """An image stored sideways with Orientation 6 ("rotate 90 cw to view"; a PNG here, as phone
    JPEGs carry it) is read upright, as PIL's exif_transpose turns it; without the tag it is unchanged."""
    im = gradient()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "sideways.png"
    im.save(path, exif=exif)
    with Image.open(path) as f:
        f.load()
        out = to_rgb(f)
    assert out.size == (4, 6)  # rotated: height and width swapped
    assert np.array_equal(np.asarray(out), np.asarray(im.transpose(Image.Transpose.ROTATE_270)))
    assert to_rgb(im) is im


def test_alpha_over_white_and_wide_grayscale_scaled():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    wide = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))  # mode I;16
    assert wide.mode.startswith("I")
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    flt = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(flt))[0, :, 1].tolist() == [0, 128, 255]
    gray = Image.fromarray(np.array([[7, 200]], dtype=np.uint8), "L")
    assert np.asarray(to_rgb(gray)).tolist() == [[[7, 7, 7], [200, 200, 200]]]


@pytest.mark.parametrize("kind", ["exif", "rgba", "wide"])
def test_the_cli_and_decontext_read_the_same_pixels(tmp_path, kind):
    """The CLI's open_image and DeContext's read_image (library) give the same array for one
    file: the protected image is close to what the user sees, whichever entry point read it."""
    from diffattn.cli.common import open_image
    from diffattn.pipelines.decontext import read_image

    path = tmp_path / f"{kind}.png"
    if kind == "exif":
        exif = Image.Exif()
        exif[ORIENTATION] = 8
        gradient().save(path, exif=exif)
    elif kind == "rgba":
        Image.new("RGBA", (4, 4), (10, 20, 30, 128)).save(path)
    else:
        Image.fromarray((np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)).save(path)
    cli = np.asarray(open_image(argparse.Namespace(max_side=1024), str(path)))
    lib, source = read_image(str(path))
    assert source == str(path) and cli.dtype == lib.dtype == np.uint8
    assert np.array_equal(cli, lib)
