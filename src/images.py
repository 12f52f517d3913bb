"""Reading images from disk as 8-bit RGB, the same way in training and inference.

PIL's own `convert("RGB")` clips 16-bit greyscale (mode I;16 / I) at 255, so a 16-bit PNG
of mid-grey 32768 would become white; and it drops alpha onto black. Here:

    I;16, I;16B, I;16L, I   16-bit range scaled to 8 bits (value / 257), then grey -> RGB
    F                       0..1 floats scaled by 255, others clipped to 0..255
    RGBA, LA, PA, P + tRNS  composited over white (transparent areas read as white paper)
    CMYK, L, 1, YCbCr, ...  PIL's conversion
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)  # what transparent pixels become


def to_rgb8(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (see the module docstring for each mode)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)  # 16-bit PNGs open as I;16 (or I)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info or mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def open_rgb8(path: str | Path) -> Image.Image:
    """The image at `path`, fully decoded, as 8-bit RGB. Raises what PIL raises for a
    missing, unknown or truncated file."""
    with Image.open(path) as image:
        image.load()
        return to_rgb8(image)
