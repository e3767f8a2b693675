"""One conversion of a decoded image to what every entry point works on: 8-bit RGB as a viewer
shows it. The CLI, the app and the library's readers (DeContext's ``read_image``) all use it, so
one file gives the same pixels whichever way it comes in."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# modes whose alpha (or palette transparency) is composited over white rather than dropped
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# high-bit-depth and float grayscale modes, scaled to 8 bits rather than clipped by PIL's convert
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB, as an image viewer shows it:

    - the EXIF orientation applied (a phone JPEG stored sideways comes out upright, and the
      tag no longer matters: outputs are written without it);
    - transparent pixels over white (RGBA, LA, palette with transparency);
    - 16-bit and float grayscale scaled to 8 bits (16-bit by 65535 when any value exceeds 255,
      float by 1 when it lies in [0, 1]); grayscale, palette and CMYK converted.
    """
    try:
        im = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im  # 0x0112: Orientation
    except Exception:  # noqa: BLE001  a malformed EXIF block: the pixels as stored (PIL raises assorted errors)
        pass
    if im.mode == "RGB":
        return im
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    if im.mode in _WIDE_MODES:
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I"):
            top = 65535.0 if a.max() > 255 else 255.0
        else:
            top = 1.0 if a.max() <= 1 else 255.0
        im = Image.fromarray((np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    return im.convert("RGB")
