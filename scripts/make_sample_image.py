"""Draws the bundled demo picture (adaptivedrag_core/assets/sample.png): a red ball on a hill under a sky.

Run once; the PNG is committed. Deterministic, so re-running gives the same file.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256


def draw_sample() -> Image.Image:
    y = np.linspace(0, 1, SIZE)[:, None, None]
    sky = (1 - y) * np.array([110, 160, 235]) + y * np.array([200, 225, 250])
    image = Image.fromarray(np.broadcast_to(sky, (SIZE, SIZE, 3)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((190, 24, 230, 64), fill=(255, 214, 90))  # sun
    draw.ellipse((-80, 150, 340, 420), fill=(70, 150, 70))  # hill
    draw.rectangle((40, 118, 70, 160), fill=(120, 80, 50))  # tree trunk
    draw.ellipse((20, 80, 90, 135), fill=(40, 110, 45))  # tree crown
    draw.ellipse((128, 130, 172, 174), fill=(210, 40, 40))  # ball
    draw.ellipse((138, 138, 150, 150), fill=(245, 150, 150))  # ball highlight
    return image.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "adaptivedrag_core" / "assets" / "sample.png"
    draw_sample().save(out)
    print(f"wrote {out}")
