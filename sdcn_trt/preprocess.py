"""Input images: folders listed with every entry accounted for, files read as 8-bit arrays (as the
contest's cv2.imread scaled them), and the preprocessing identical to the original canny2image:
HWC3, resize_image, Canny, control."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from sdcn_trt.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jp2", ".gif")
_STDERR_LOCK = threading.RLock()  # one thread captures fd 2 at a time (nesting is fine)
_OPENCV_PREFIX = re.compile(r"^\[\s*(?:WARN|ERROR|INFO|DEBUG|FATAL)[^\]]*\]\s*(?:global\s+\S+\s+\S+\s+)?")


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


# -- reading image files -------------------------------------------------------------------------------
@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Collect what native code (OpenCV, libpng, libtiff) writes to file descriptor 2 while inside, so
    that it reaches the caller's message instead of the terminal (through a progress bar). The list
    is filled on exit; OpenCV's "[ WARN:0@0.1] global grfmt_png.cpp:297 readHeader" prefixes are cut.
    Anything another thread writes to stderr meanwhile is collected too; in a process started
    without fd 2 (a daemon) it works the same and leaves fd 2 closed."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as captured:
        if sys.stderr is not None:  # None when Python started without fd 2
            sys.stderr.flush()
        saved = os.dup(2)  # with fd 2 closed, the temporary file took fd 2: this restores it as it was
        os.dup2(captured.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            cleaned = (_OPENCV_PREFIX.sub("", line).strip() for line in text.splitlines())
            lines += dict.fromkeys(line for line in cleaned if line)


@dataclass(frozen=True)
class LoadedImage:
    """An image file's pixels (uint8 HxW or HxWxC, BGR order) and what reading it changed or reported."""

    image: np.ndarray
    notes: tuple[str, ...] = ()  # e.g. "first of 3 frames", "16-bit scaled to 8 bits", OpenCV's warnings


def to_8bit(data: np.ndarray, image: np.ndarray, path: Path) -> tuple[np.ndarray, str]:
    """A 16-bit or float image as 8 bits, and a note saying how. 16-bit (and any depth cv2.imread's
    colour mode reads) takes imread's own 8-bit colour values (each format scales as its library does:
    PNG keeps the high byte, TIFF rounds v/257); alpha is scaled v*255/65535, rounded. Float images,
    which cv2.imread cannot read in colour, are taken as 0..1 and scaled to 0..255, rounded and clipped
    (NaN as 0). EXIF orientation is ignored, as for 8-bit files."""
    with native_stderr():  # the colour decode of a float TIFF fails, and says so, as expected
        color = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)  # (H, W, 3) uint8 or None
    depth = f"{image.dtype} ({image.dtype.itemsize * 8}-bit)"
    if color is not None and color.shape[:2] == image.shape[:2]:
        if image.ndim == 3 and image.shape[2] == 4:
            peak = float(np.iinfo(image.dtype).max) if image.dtype.kind in "ui" else 1.0
            alpha = np.clip(np.rint(image[:, :, 3:4].astype(np.float64) * (255.0 / peak)), 0, 255).astype(np.uint8)
            color = np.concatenate([color, alpha], axis=2)  # (H, W, 4)
        return color, f"{depth} scaled to 8 bits as cv2.imread does"
    if image.dtype.kind != "f":
        raise InputError(f"image {path} has dtype {image.dtype}, which OpenCV cannot turn into 8 bits; supported: "
                         "8-bit and 16-bit integer images and float images (0..1)")
    scaled = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), f"{depth} float values 0..1 scaled to 0..255"


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read an image file as the contest did (cv2, BGR order), keeping gray and alpha for HWC3.

    Multi-frame files (animated GIF, multi-page TIFF) give their first frame, and the notes say how
    many there were; 16-bit and float images are scaled to 8 bits (`to_8bit`). What OpenCV prints
    while decoding goes into the error (a file it cannot decode) or the notes, not to the terminal.
    The canny map does not depend on channel order, so BGR input gives the reference's control.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:  # no read permission, an I/O error
        raise InputError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    if data.size == 0:
        raise InputError(f"image file is empty: {path}")
    with native_stderr() as messages:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        said = f" (OpenCV: {'; '.join(messages)})" if messages else ""
        raise InputError(f"cannot decode image file {path}: not an image, or a format OpenCV cannot read{said}")
    notes = [f"OpenCV: {'; '.join(messages)}"] if messages else []
    with native_stderr():
        frames = cv2.imcount(str(path)) if path.suffix.lower() in (".gif", ".tif", ".tiff", ".webp", ".png") else 1
    if frames > 1:
        notes.append(f"first of {frames} frames")
    if image.dtype != np.uint8:
        image, note = to_8bit(data, image, path)
        notes.append(note)
    return LoadedImage(check_image(image, name=f"image {path}"), tuple(notes))


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """The pixels `read_image` reads (uint8, BGR order, gray and alpha kept)."""
    return read_image(path).image


# -- listing input folders -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderEntry:
    """One entry under an input folder: an image to run, or a file skipped and why."""

    path: Path
    skip: str | None = None  # why it is not run; None for an image file


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _classify(path: Path) -> tuple[str, str]:
    """("image" | "folder" | "skip", why skipped) for one entry, following links."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if not path.is_symlink():
            return "skip", f"unreadable ({exc.strerror})"
        if exc.errno == errno.ELOOP:
            return "skip", "a looping link (links that point at each other, never at a file)"
        if exc.errno == errno.ENOENT:
            return "skip", f"a broken link (to {os.readlink(path)}, which does not exist)"
        return "skip", f"a link that cannot be followed ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "folder", ""
    if not stat.S_ISREG(mode):
        return "skip", f"not a regular file ({_file_kind(mode)})"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        suffix = f"extension {path.suffix!r}" if path.suffix else "no extension"
        return "skip", f"not an image file name ({suffix}; images end in {' '.join(IMAGE_SUFFIXES)})"
    if not os.access(path, os.R_OK):
        return "skip", "unreadable (permission denied)"
    return "image", ""


def scan_folder(folder: str | os.PathLike[str], recursive: bool = True) -> list[FolderEntry]:
    """Every entry under `folder`, sorted by path: image files (by suffix, case-insensitive) and the
    rest with why each is skipped (not an image file name, a folder when not recursive, a broken or
    looping link, unreadable). Links are followed; a linked folder already listed is not entered again."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise InputError(f"input folder {folder} {what}; give a folder of images")
    entries: list[FolderEntry] = []
    entered = {os.path.realpath(folder)}

    def walk(directory: Path) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            entries.append(FolderEntry(directory, f"an unreadable folder ({exc.strerror})"))
            return
        for name in names:
            path = directory / name
            kind, why = _classify(path)
            if kind == "folder" and not recursive:
                entries.append(FolderEntry(path, "a folder (not entered: recursion is off)"))
            elif kind == "folder" and os.path.realpath(path) in entered:
                entries.append(FolderEntry(path, "a link to a folder already listed (entering it would loop)"))
            elif kind == "folder":
                entered.add(os.path.realpath(path))
                walk(path)
            else:
                entries.append(FolderEntry(path, why or None))

    walk(folder)
    return sorted(entries, key=lambda e: e.path)


def find_images(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files under `folder` (common suffixes, case-insensitive), sorted; see `scan_folder` for the rest."""
    return [e.path for e in scan_folder(folder, recursive) if e.skip is None]


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
