"""Training and held-out data of the `tiny-trained` preset, made offline from what packages ship.

Two sources (scripts/train_tiny.py mixes them, benchmarks/held_out.py evaluates on what it leaves out):
  - photos: every colour and grey photo in `skimage.data` that needs no download, with short captions;
    HELD_OUT_PHOTOS are never in TRAINING_PHOTOS (scikit-learn's sample images are not used: the
    project does not depend on scikit-learn and it is not installed here);
  - drawn scenes: shapes, lines, text, plain / gradient / striped backgrounds in named colours, with a
    caption that names every colour drawn ("a red circle and blue text on a white background").
    Scene `seed` k draws the same scene on every machine; training uses seeds below HELD_OUT_SEED_START,
    the held-out evaluation seeds from it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import cv2
import numpy as np

from sdcn_trt import preprocess
from sdcn_trt.errors import InputError
from sdcn_trt.images import PHOTO_PROMPTS

CANNY = (100, 200)  # the contest's thresholds
HELD_OUT_SEED_START = 1_000_000  # scene seeds >= this are never trained on

# colour words and their RGB (each drawn colour is jittered a little around these)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 165, 60), "blue": (35, 70, 215), "yellow": (240, 215, 40),
    "orange": (245, 135, 25), "purple": (135, 45, 165), "pink": (245, 140, 190), "brown": (125, 75, 35),
    "black": (20, 20, 20), "white": (245, 245, 245), "grey": (128, 128, 128), "cyan": (40, 200, 215),
}
LIGHT = ("white", "grey", "yellow", "pink", "cyan")  # light backgrounds (what a user draws on)
WORDS = ("HELLO", "CAT", "SUN", "ABC", "STOP", "TREE", "SDCN", "42", "MOON", "BOX")
SHAPES = ("circle", "ring", "square", "rectangle", "triangle", "polygon", "line", "thick line", "text")

# skimage.data photos: the eight colour photos of PHOTO_PROMPTS, the grey ones and two drawings;
# the two held-out photos are grey photos that no version of the preset was trained on.
TRAINING_PHOTOS: dict[str, str] = {
    **PHOTO_PROMPTS,
    "brick": "a brick wall", "cell": "a cell under a microscope", "coins": "old coins", "grass": "grass",
    "gravel": "gravel", "moon": "the surface of the moon", "page": "a page of a book", "text": "printed text",
    "checkerboard": "a checkerboard", "horse": "a horse", "shepp_logan_phantom": "a medical phantom",
    "colorwheel": "a colour wheel", "logo": "a logo",
}
HELD_OUT_PHOTOS: dict[str, str] = {"camera": "a man with a camera", "clock": "a clock"}


def load_photo(name: str) -> np.ndarray:
    """A skimage.data photo as RGB uint8 HxWx3 (grey, boolean, float and RGBA ones converted)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    if image.dtype == bool:
        image = np.where(image, 255, 0).astype(np.uint8)
    elif image.dtype != np.uint8:  # shepp_logan_phantom: float in [0, 1]
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:  # logo: RGBA over white
        alpha = image[:, :, 3:].astype(np.float32) / 255
        image = (image[:, :, :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return preprocess.hwc3(image)


@dataclass
class Picture:
    """One training or evaluation picture: RGB uint8 HxWx3, its canny map (uint8 HxWx3) and caption."""

    name: str
    image: np.ndarray
    control: np.ndarray
    caption: str


def jitter_colours(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random hue shift, saturation and brightness of an RGB uint8 image."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)  # H in [0, 180)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-12, 12)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.3), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.75, 1.2), 0, 255)
    return cv2.cvtColor(hsv.round().astype(np.uint8), cv2.COLOR_HSV2RGB)


def photo_pictures(photos: dict[str, str], per_photo: int, seed: int,
                   resolutions: tuple[int, ...] = (256, 320)) -> list[Picture]:
    """`per_photo` variants of each photo: resized as the pipeline resizes (a random resolution),
    mirrored half the time, colours jittered (the first variant of each photo unjittered)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, caption in photos.items():
        photo = load_photo(name)
        for k in range(per_photo):
            image = preprocess.resize_image(photo, int(rng.choice(resolutions)))
            if rng.random() < 0.5:
                image = np.ascontiguousarray(image[:, ::-1])
            if k > 0:
                image = jitter_colours(image, rng)
            out.append(Picture(name, image, preprocess.canny_map(image, *CANNY), caption))
    return out


# -- drawn scenes ------------------------------------------------------------------------------------
@dataclass
class Scene:
    """A drawn scene: its image, what was drawn ((shape, colour word) per object) and the background."""

    seed: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[tuple[str, str]] = field(default_factory=list)
    background: str = ""  # "a white background", "red and blue stripes", ...
    background_colours: tuple[str, ...] = ()
    mask: np.ndarray | None = None  # (H, W) bool: the pixels the objects were drawn on (what their words colour)

    def caption(self, colour: str | None = None) -> str:
        """'a red circle, a blue square and black text on a white background'; `colour` names every
        object in that colour instead (the prompt-colour check)."""
        parts = []
        for shape, drawn in self.objects:
            word = colour or drawn
            parts.append(f"{word} text" if shape == "text" else f"a {word} {shape}")
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{listed} on {self.background}"

    @property
    def colours(self) -> set[str]:
        return {c for _, c in self.objects} | set(self.background_colours)


def _rgb(rng: np.random.Generator, word: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[word], np.int32)
    return tuple(int(v) for v in np.clip(base + rng.integers(-18, 19, 3), 0, 255))  # type: ignore[return-value]


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str, tuple[str, ...]]:
    kind = rng.choice(["light", "plain", "gradient", "stripes"], p=[0.5, 0.15, 0.2, 0.15])
    if kind in ("light", "plain"):
        word = str(rng.choice(LIGHT if kind == "light" else list(COLOURS)))
        return np.full((h, w, 3), _rgb(rng, word), np.uint8), f"a {word} background", (word,)
    first, second = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
    a, b = np.array(_rgb(rng, first), np.float32), np.array(_rgb(rng, second), np.float32)
    if kind == "gradient":
        ramp = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        ramp = ramp[None, :, None] if ramp.size == w else ramp[:, None, None]  # (1, W, 1) or (H, 1, 1)
        image = np.broadcast_to(a + (b - a) * ramp, (h, w, 3))
        return image.round().astype(np.uint8), f"a {first} to {second} gradient", (first, second)
    period = int(rng.integers(max(4, h // 16), max(5, h // 4)))
    stripes = (np.arange(h if rng.random() < 0.5 else w) // period) % 2  # 0/1 per row or column
    mask = stripes[:, None] if stripes.size == h else stripes[None, :]
    image = np.where(np.broadcast_to(mask, (h, w))[..., None] == 0, a, b)
    return image.astype(np.uint8), f"{first} and {second} stripes", (first, second)


def _draw(image: np.ndarray, rng: np.random.Generator, shape: str, colour: tuple[int, int, int]) -> None:
    h, w = image.shape[:2]
    side = min(h, w)
    cx, cy = int(rng.integers(side // 8, w - side // 8)), int(rng.integers(side // 8, h - side // 8))
    size = int(rng.integers(side // 10, side // 3))
    line = cv2.LINE_AA
    if shape == "circle":
        cv2.circle(image, (cx, cy), size, colour, -1, line)
    elif shape == "ring":
        cv2.circle(image, (cx, cy), size, colour, max(2, side // 40), line)
    elif shape in ("square", "rectangle"):
        sx = size
        sy = size if shape == "square" else int(size * rng.uniform(0.35, 0.7))
        if shape == "rectangle" and rng.random() < 0.5:
            sx, sy = sy, sx
        cv2.rectangle(image, (cx - sx, cy - sy), (cx + sx, cy + sy), colour, -1, line)
    elif shape in ("triangle", "polygon"):
        n = 3 if shape == "triangle" else int(rng.integers(5, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n)) if shape == "polygon" else \
            rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        radii = size * (rng.uniform(0.6, 1.0, n) if shape == "polygon" else np.ones(n))
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).round().astype(np.int32)
        cv2.fillPoly(image, [points], colour, line)
    elif shape in ("line", "thick line"):
        end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        thickness = max(1, side // 64) if shape == "line" else int(rng.integers(max(3, side // 32), max(4, side // 12)))
        cv2.line(image, (cx, cy), end, colour, thickness, line)
    else:  # text
        word = str(rng.choice(WORDS))
        scale = side / 128 * rng.uniform(0.8, 1.6)
        thickness = max(1, int(round(scale * 2)))
        (tw, th), _ = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        x, y = int(rng.integers(0, max(1, w - tw))), int(rng.integers(th, max(th + 1, h)))
        cv2.putText(image, word, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, line)


def draw_scene(seed: int, height: int = 256, width: int = 256) -> Scene:
    """One to four shapes, lines or words in named colours on a plain, gradient or striped background;
    the same seed and size draw the same scene. Objects differ in colour from the background."""
    rng = np.random.default_rng(seed)
    image, background, background_colours = _background(rng, height, width)
    image = np.ascontiguousarray(image)
    mask = np.zeros(image.shape, np.uint8)  # (H, W, 3): the objects drawn again, in white
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        shape = str(rng.choice(SHAPES))
        word = str(rng.choice([c for c in COLOURS if c not in background_colours]))
        replay = copy.deepcopy(rng)  # the same draws again, on the mask: the same shape in the same place
        _draw(image, rng, shape, _rgb(rng, word))
        _rgb(replay, word)
        _draw(mask, replay, shape, (255, 255, 255))
        objects.append((shape, word))
    return Scene(seed, image, objects, background, background_colours, mask=mask[..., 0] > 127)


def scene_pictures(seeds: range | list[int], height: int, width: int) -> list[Picture]:
    out = []
    for seed in seeds:
        scene = draw_scene(seed, height, width)
        out.append(Picture(f"scene{seed}", scene.image, preprocess.canny_map(scene.image, *CANNY), scene.caption()))
    return out


def training_scene_seeds(count: int, offset: int = 0) -> range:
    """Scene seeds for training: below HELD_OUT_SEED_START, whatever the count."""
    if offset + count > HELD_OUT_SEED_START:
        raise InputError(f"training scene seeds {offset}..{offset + count} reach the held-out range "
                         f"(seeds >= {HELD_OUT_SEED_START}); use fewer than {HELD_OUT_SEED_START - offset}")
    return range(offset, offset + count)
