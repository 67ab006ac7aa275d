"""Broken image files of the kinds real collections contain, for the tests."""

import os

import cv2
import numpy as np


def make_bad_files(directory) -> dict[str, str]:
    """Write broken image files into ``directory``; return {file name: expected reason keyword}.

    - ``empty.jpg``: zero bytes ('empty');
    - ``truncated.jpg``: the first half of a valid JPEG ('truncated');
    - ``not_an_image.jpg``: a text file with a .jpg name ('decode');
    - ``tiny.png``: a valid 40x30 px PNG, too small for any backbone ('too small');
    - ``corrupt.png``: a valid PNG signature and header followed by scrambled data ('decode').
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:320]
    img = np.dstack([(xx * 0.8) % 256, (yy * 0.9) % 256, ((xx + yy) * 0.4) % 256]).astype(np.uint8)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)

    def path(name):
        return os.path.join(directory, name)

    with open(path("empty.jpg"), "wb"):
        pass
    ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    jpeg = jpeg.tobytes()
    with open(path("truncated.jpg"), "wb") as f:
        f.write(jpeg[: len(jpeg) // 2])
    with open(path("not_an_image.jpg"), "w", encoding="ascii") as f:
        f.write("This is a text file that only has an image's name.\n" * 20)
    cv2.imwrite(path("tiny.png"), img[:30, :40])
    ok, png = cv2.imencode(".png", img)
    png = bytearray(png.tobytes())
    data_start = 8 + 25  # signature, then the 25-byte IHDR chunk: both left intact
    garbage = rng.integers(0, 256, size=len(png) - data_start - 40, dtype=np.uint8)
    png[data_start + 40:] = garbage.tobytes()
    with open(path("corrupt.png"), "wb") as f:
        f.write(bytes(png))
    return {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "not_an_image.jpg": "decode",
        "tiny.png": "too small",
        "corrupt.png": "decode",
    }
