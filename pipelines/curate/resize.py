"""Resize for the crawl: img2dataset's resize modes, built for a crawl that runs near the CPU limit.

The modes, sizes, interpolations, alpha matting and encoding are img2dataset's (`Resizer`, same
names and defaults: area when shrinking, lanczos when enlarging, the smallest or longest side scaled
to `image_size` with Python's round, a centred crop, white borders). Three costs of its Resizer are
not paid here (bench/curate.py --profile; per 640x480 JPEG on this machine):

- the full-size JPEG decode when the target is much smaller: libjpeg decodes at 1/2, 1/4 or 1/8
  scale in the DCT domain (`cv2.IMREAD_REDUCED_COLOR_k`), taken only while the reduced side still
  covers the target, then the same area resize does the rest;
- rebuilding albumentations transforms for every image (its validation and RNG seeding);
- redirecting the process's stdout/stderr file descriptors around each call (racy with threads).

The pixel hash is taken from the resized pixels, so the stored image is never decoded again.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DOWNSCALE = cv2.INTER_AREA  # img2dataset's downscale_interpolation="area"
UPSCALE = cv2.INTER_LANCZOS4  # img2dataset's upscale_interpolation="lanczos"
REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
SMALLEST_SIDE = ("keep_ratio", "center_crop")
LONGEST_SIDE = ("keep_ratio_largest", "border")
ENCODE = {"jpg": (".jpg", cv2.IMWRITE_JPEG_QUALITY), "png": (".png", cv2.IMWRITE_PNG_COMPRESSION),
          "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY)}


class ResizeError(ValueError):
    """The body did not decode, or the result did not encode."""


@dataclass
class Resized:
    data: bytes
    width: int
    height: int
    pixels: np.ndarray  # the encoded image's pixels, BGR uint8 (H, W, 3), for hashing


class Resizer:
    """`Resizer(size, mode, ...)(body, fmt, width, height)`: decode, resize, encode one image.

    `width`/`height` are the original size read from the header (the crawl reads it before any
    decode to apply its pixel cap); they pick the JPEG reduction.
    """

    def __init__(self, image_size: int, resize_mode: str, resize_only_if_bigger: bool = False,
                 encode_format: str = "jpg", encode_quality: int = 95):
        if resize_mode not in ("no", *SMALLEST_SIDE, *LONGEST_SIDE):
            raise ValueError(f"resize_mode={resize_mode!r}; choose no, {', '.join(SMALLEST_SIDE + LONGEST_SIDE)}")
        if encode_format not in ENCODE:
            raise ValueError(f"encode_format={encode_format!r}; choose {', '.join(ENCODE)}")
        self.size = image_size
        self.mode = resize_mode
        self.only_if_bigger = resize_only_if_bigger
        ext, flag = ENCODE[encode_format]
        self.ext, self.encode_params = ext, [int(flag), int(encode_quality)]

    def target_side(self, width: int, height: int) -> int | None:
        """The side scaled to `size`, or None when this image is not resized."""
        if self.mode == "no":
            return None
        side = min(width, height) if self.mode in SMALLEST_SIDE else max(width, height)
        if self.only_if_bigger and side <= self.size:
            return None
        return side

    def __call__(self, body: bytes, fmt: str, width: int, height: int) -> Resized:
        buf = np.frombuffer(body, np.uint8)
        side = self.target_side(width, height)
        factor = 1
        if fmt == "jpeg" and side is not None:
            factor = next((k for k in (8, 4, 2) if side // k >= self.size), 1)
        if factor > 1:
            img = cv2.imdecode(buf, REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
        else:
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ResizeError(f"{fmt} body of {len(body)} bytes does not decode")
        img = _to_bgr(img)
        if side is not None:
            img = self._resize(img)
        ok, encoded = cv2.imencode(self.ext, img, self.encode_params)
        if not ok:
            raise ResizeError(f"cannot encode {img.shape[1]}x{img.shape[0]} as {self.ext}")
        return Resized(encoded.tobytes(), img.shape[1], img.shape[0], img)

    def _resize(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        side = min(h, w) if self.mode in SMALLEST_SIDE else max(h, w)
        scale = self.size / side
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        img = cv2.resize(img, (new_w, new_h), interpolation=DOWNSCALE if scale < 1 else UPSCALE)
        s = self.size
        if self.mode == "center_crop":
            top, left = (new_h - s) // 2, (new_w - s) // 2
            img = img[top:top + s, left:left + s]
        elif self.mode == "border":
            top, left = (s - new_h) // 2, (s - new_w) // 2
            img = cv2.copyMakeBorder(img, top, s - new_h - top, left, s - new_w - left,
                                     cv2.BORDER_CONSTANT, value=(255, 255, 255))
        return np.ascontiguousarray(img)


def _to_bgr(img: np.ndarray) -> np.ndarray:
    """3-channel BGR uint8: grey expanded, alpha matted on white (as img2dataset does)."""
    if img.dtype != np.uint8:  # 16-bit PNGs
        img = (img / 257).round().astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32)
        out = alpha / 255 * img[:, :, :3] + 255 - alpha
        return np.rint(out.clip(0, 255)).astype(np.uint8)
    return img
