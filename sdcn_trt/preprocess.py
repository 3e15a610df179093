"""Image preprocessing identical to the original canny2image: HWC3, resize_image, Canny, control."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch

from sdcn_trt.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jp2")


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Raise InputError unless `image` is a non-empty uint8 array of shape HxW or HxWxC, C in 1, 3, 4."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"{name} has dtype {image.dtype}; only 8-bit images (uint8) are supported")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise InputError(f"{name} has shape {image.shape}; expected HxW or HxWxC with C in 1, 3 or 4")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name} has zero size: shape {image.shape}")
    return image


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as the contest did (cv2, BGR order), keeping gray and alpha for HWC3.

    The canny map does not depend on channel order, so BGR input gives the reference's control.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise InputError(f"image file is empty: {path}")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot decode image file {path}: not an image, or a format OpenCV cannot read")
    return check_image(image, name=f"image {path}")


def hwc3(x: np.ndarray) -> np.ndarray:
    """Gray -> 3 channels; RGBA -> RGB blended over white with the reference's float32 arithmetic."""
    x = check_image(x)
    if x.ndim == 2:
        x = x[:, :, None]
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    blended = color * alpha + 255.0 * (1.0 - alpha)
    return blended.clip(0, 255).astype(np.uint8)


def resize_shape(height: int, width: int, resolution: int) -> tuple[int, int, bool]:
    """(new_height, new_width, enlarging): short side -> resolution, both rounded to multiples of 64."""
    k = float(resolution) / min(float(height), float(width))
    new_h = int(np.round(height * k / 64.0)) * 64
    new_w = int(np.round(width * k / 64.0)) * 64
    if new_h == 0 or new_w == 0:
        raise InputError(f"image {height}x{width} at resolution {resolution} resizes to {new_h}x{new_w}")
    return new_h, new_w, k > 1


def check_side(height: int, width: int, max_side: int, original: tuple[int, ...] | None = None) -> None:
    """InputError before any compute when an image's (resized) long side exceeds `max_side`: a 64x2000
    photo resizes to 256x8000 at resolution 256, which would run for many minutes."""
    if max(height, width) > max_side:
        source = f"image {original[0]}x{original[1]} resizes to {height}x{width}" if original else f"image {height}x{width}"
        raise InputError(f"{source}: its long side exceeds max_side={max_side}; crop it, lower image_resolution, "
                         f"or raise max_side")


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """The reference's resize_image: LANCZOS4 when enlarging, AREA when shrinking."""
    height, width = image.shape[:2]
    new_h, new_w, enlarging = resize_shape(height, width, resolution)
    interpolation = cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to an exact size with resize_image's rule: LANCZOS4 when enlarging, AREA when shrinking."""
    enlarging = height * width > image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA)


def canny_map(image: np.ndarray, low_threshold: int, high_threshold: int) -> np.ndarray:
    """HWC3(cv2.Canny(image, low, high)): the 3-channel edge map the ControlNet sees (0 or 255)."""
    if low_threshold < 0 or high_threshold < 0:
        raise InputError(f"Canny thresholds must be >= 0, got {low_threshold}, {high_threshold}")
    return hwc3(cv2.Canny(image, low_threshold, high_threshold))


def prepare(image: np.ndarray, resolution: int, low_threshold: int, high_threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """(resized input, detected map), both uint8 HxWx3, exactly as canny2image computes them."""
    resized = resize_image(hwc3(image), resolution)
    return resized, canny_map(resized, low_threshold, high_threshold)


def control_tensor(detected_map: np.ndarray, num_samples: int) -> torch.Tensor:
    """detected_map / 255 as float32 NCHW, repeated per sample: (num_samples, 3, H, W)."""
    control = torch.from_numpy(detected_map.copy()).float() / 255.0  # (H, W, 3)
    return control.permute(2, 0, 1).unsqueeze(0).repeat(num_samples, 1, 1, 1).contiguous()


def find_images(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files under `folder` (common suffixes, case-insensitive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder not found: {folder}")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
