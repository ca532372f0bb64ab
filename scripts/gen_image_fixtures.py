"""Image-decoding fixtures: what Pillow gives for the pictures whose decoding is easy to get
wrong.

- 16-bit PNGs of every colour type: Pillow keeps the high byte of 16-bit RGB(A) and grey with
  alpha, but clips 16-bit grey (mode I;16) to 0..255 when converting to RGB.
- A JPEG with EXIF orientation 6 (rotated a quarter turn): `Image.open` does not apply it.

Each picture `NAME.png`/`NAME.jpg` comes with `NAME.rgb.png`, the RGB pixels transformers'
`convert_to_rgb` makes of `Image.open(...)` (transparency composited onto white), written as
an 8-bit PNG. Run from the repository root: `python scripts/gen_image_fixtures.py`.
"""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "images"


def png16(width, height, colour_type, samples):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB or grey with alpha)."""
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def convert_to_rgb(image):
    """transformers.image_transforms.convert_to_rgb."""
    if image.mode == "RGB":
        return image
    image_rgba = image.convert("RGBA")
    background = Image.new("RGBA", image_rgba.size, (255, 255, 255))
    alpha_composite = Image.alpha_composite(background, image_rgba)
    return alpha_composite.convert("RGB")


def save(name, data):
    path = OUT / name
    path.write_bytes(data)
    rgb = convert_to_rgb(Image.open(io.BytesIO(data)))
    rgb.save(OUT / (path.stem + ".rgb.png"))
    print(f"{name}: {Image.open(io.BytesIO(data)).mode} {rgb.size}")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(16)
    width, height = 7, 5
    for name, colour_type, channels in [("grey16", 0, 1), ("greyalpha16", 4, 2), ("rgb16", 2, 3), ("rgba16", 6, 4)]:
        samples = rng.integers(0, 65536, size=(height, width * channels), dtype=np.uint32)
        # Small values (where clipping and scaling differ most) and values around 257 * k.
        samples[0, : width * channels] = rng.integers(0, 600, size=width * channels)
        samples[1, :channels] = 0x80FF
        save(f"{name}.png", png16(width, height, colour_type, samples))

    # A 12x8 picture stored as is, with EXIF saying "rotate 90 degrees clockwise to view".
    pixels = rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    pixels[:, :6] = [200, 30, 30]
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    save("exif6.jpg", buffer.getvalue())


if __name__ == "__main__":
    main()
