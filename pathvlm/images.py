"""Images: one reader for training, evaluation and the judges (open_image: decoded to the end, any mode
as 8-bit RGB), one check for the preparers and the input checks (image_problem).
"""

import functools
import hashlib
import os

# Qwen2.5-VL's image processor refuses an image whose long side is over 200 times its short side
# (transformers' qwen2_vl smart_resize: "absolute aspect ratio must be smaller than 200").
MAX_ASPECT_RATIO = 200
# Modes whose pixels do not fit 8 bits: 16-bit PNG/TIFF (I;16*), 32-bit integer (I) and float (F).
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def open_image(path):
    """The image at `path` (a path or a binary file object), decoded to the end, upright, as 8-bit RGB (to_rgb).
    Upright: a phone photo of a slide is stored as the sensor saw it, with an EXIF tag saying how to turn it."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here, not later in a batch
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB. convert("RGB") alone clips 16-bit and 32-bit pixels at 255 (a
    16-bit scan comes out almost white) and drops transparency onto black. Here wide modes are stretched
    from their own minimum to their own maximum, as an image viewer windows them, and transparent pixels
    (RGBA, LA, PA, a palette or grey with a transparent colour) are laid on white, a slide's background."""
    import numpy as np
    from PIL import Image

    if image.mode in WIDE_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        image = Image.fromarray(np.round((pixels - low) * 255 / ((high - low) or 1)).astype(np.uint8), "L")
    if image.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def image_problem(source, name: str) -> str | None:
    """Why the image `source` (a path or a binary file object; `name` says which in the reason) cannot be
    shown to the model, or None. It must decode to its last byte, which Image.verify() does not check (a
    truncated JPEG passes it and fails in training when drawn), and convert to RGB; its aspect ratio must
    be one Qwen2.5-VL's processor takes."""
    try:
        width, height = open_image(source).size
    except Exception as e:  # any decoder error means the image is unusable
        detail = str(e).replace(repr(source), "the file")[:120]  # not "<_io.BytesIO object at 0x7f...>"
        return f"image unreadable: {name} ({type(e).__name__}: {detail})"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"image too elongated: {name} is {width}x{height} px, an aspect ratio above {MAX_ASPECT_RATIO}, "
                "which Qwen2.5-VL's image processor refuses: crop it into parts or pad it")
    return None


@functools.lru_cache(maxsize=None)
def file_image_problem(path: str, size: int, mtime_ns: int, name: str) -> str | None:
    """image_problem of a file, once per version of the file: a preparer checks a record twice (before
    dealing and when writing), and questions share images."""
    return image_problem(path, name)


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read once per version of the file (its size and mtime): questions share images,
    and the preparers' deal, the held-out check and eval's resume each ask for an image's identity."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
