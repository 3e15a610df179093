"""Writing images: atomic PNG/JPEG writes, output folders checked before any work, and labelled contact
sheets people can look at."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from sdcn_trt.cache import atomic_path
from sdcn_trt.errors import InputError
from sdcn_trt.preprocess import native_stderr


def encode_image(image: np.ndarray, suffix: str = ".png") -> bytes:
    """RGB (or gray) uint8 -> encoded bytes in the format of `suffix`."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, data = cv2.imencode(suffix, bgr)
    if not ok:
        raise InputError(f"OpenCV cannot encode an image as {suffix}")
    return data.tobytes()


def save_image(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB uint8 image; the file appears complete or not at all."""
    path = Path(path)
    data = encode_image(image, path.suffix.lower() or ".png")
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:  # a file where a folder should be, a read-only folder, a full disk
        raise InputError(write_error(path, exc)) from exc
    return path


def check_output_folder(folder: str | Path, what: str, writable: bool = True) -> None:
    """InputError, before any work and without creating anything, for an output folder that cannot be
    made or written: a file in its place or in a parent's, or (with `writable`) a nearest existing
    folder this user cannot write into. `what` names the setting (a flag) in the message."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == folder else f" ({existing} is a file)"
        raise InputError(f"{what} {folder} is not a folder{where}; give a folder (created if missing)")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" ({existing} is read-only)"
        raise InputError(f"{what} {folder} is not writable{where}; give a folder you can write into")


def write_error(path: Path, exc: OSError) -> str:
    """Why `path` could not be written, naming the path the system refused when it is another one
    (a file standing where a parent folder should be)."""
    where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != path else ""
    return f"cannot write {path}: {exc.strerror or exc}{where}"


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((22, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text[:40], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile], axis=0)


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str], tile: int = 192) -> np.ndarray:
    """A grid of RGB tiles (each row one input), every column headed by its label."""
    out_rows = []
    for row in rows:
        tiles = []
        for image, label in zip(row, labels[:len(row)], strict=True):  # a row may be shorter
            rgb = image if image.ndim == 3 else np.stack([image] * 3, axis=-1)
            h, w = rgb.shape[:2]
            scaled = cv2.resize(rgb, (max(1, round(w * tile / h)), tile), interpolation=cv2.INTER_AREA)
            tiles.append(_label(scaled, label))
        out_rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in out_rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in out_rows]
    return np.concatenate(padded, axis=0)


def read_contest_image(path: str | Path) -> np.ndarray:
    """`cv2.imread(path)` as the contest's scorer read its photos: 3-channel BGR, EXIF orientation applied,
    alpha dropped, 16-bit scaled to 8 — so `sdcn-trt score` and the `hackathon` class see the same array."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"image file is empty: {path}")
    with native_stderr() as messages:  # OpenCV's own complaints go into the error, not to the terminal
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        said = f" (OpenCV: {'; '.join(messages)})" if messages else ""
        raise InputError(f"cannot decode image file {path}: not an image, or a format OpenCV cannot read{said}")
    return image


def write_contest_image(path: Path, image: np.ndarray) -> Path:
    """cv2.imwrite of the array as it is, as the contest's scorer did (an RGB array written as BGR):
    reference and accelerated images take the same path, so PD compares like with like."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(write_error(path, exc)) from exc
    if not cv2.imwrite(str(path), image):
        raise InputError(f"cannot write image {path}")
    return path


DEFAULT_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")

# scikit-image's colour photos with short captions: what the tiny-trained preset was trained on
# (scripts/train_tiny.py), and the prompts the demo gives each photo.
PHOTO_PROMPTS = {
    "astronaut": "a woman astronaut",
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket at night",
    "stereo_motorcycle": "a motorcycle",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "cells under a microscope",
    "retina": "the retina of an eye",
}


def sample_photos(names: list[str] | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """RGB uint8 photos shipped inside scikit-image."""
    import skimage.data

    photos = {}
    for name in names or DEFAULT_SAMPLES:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise InputError(f"skimage.data has no sample {name!r}")
        image = loader()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
        photos[name] = image[:, :, :3] if image.ndim == 3 else image
    return photos
