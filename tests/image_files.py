"""Image files the tests read: a phone photo stored sideways, a 16-bit grayscale ramp."""

import numpy as np
from PIL import Image


def orientation_6_jpeg(path):
    """A 128x96 JPEG stored sideways (left half red, right half blue) whose EXIF says: turn it 90 degrees
    clockwise to show it, as a phone held upright writes it. Returns ``path``."""
    stored = Image.new("RGB", (128, 96), (255, 0, 0))
    stored.paste((0, 0, 255), (64, 0, 128, 96))
    exif = Image.Exif()
    exif[274] = 6
    stored.save(path, exif=exif.tobytes(), quality=95)
    return path


def ramp16(width=53, height=37):
    """A 16-bit grayscale ("I;16") ramp from black to white."""
    return Image.fromarray((np.linspace(0, 65535, width * height).reshape(height, width)).astype(np.uint16))
