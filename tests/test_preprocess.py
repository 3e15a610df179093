import cv2
import numpy as np
import pytest
import torch

from sdcn_trt import InputError
from sdcn_trt import preprocess as pp


def test_hwc3_gray_and_rgb():
    gray = np.array([[0, 128], [255, 7]], np.uint8)
    out = pp.hwc3(gray)
    assert out.shape == (2, 2, 3) and (out == gray[:, :, None]).all()
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert pp.hwc3(rgb) is rgb
    assert pp.hwc3(gray[:, :, None]).shape == (2, 2, 3)


def test_hwc3_rgba_blends_over_white_like_the_reference():
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [10, 20, 30, 128]]], np.uint8)
    out = pp.hwc3(rgba)
    # hand-computed: color * a + 255 * (1 - a), float32, truncated
    a = np.float32(128) / np.float32(255)
    expected_last = [int(np.float32(c) * a + np.float32(255) * (np.float32(1) - a)) for c in (10, 20, 30)]
    assert out[0, 0].tolist() == [200, 100, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == expected_last == [132, 137, 142]


@pytest.mark.parametrize("h,w,res,expected", [
    (256, 384, 256, (256, 384, False)),  # the contest's inputs: unchanged size, AREA
    (512, 512, 256, (256, 256, False)),
    (100, 150, 256, (256, 384, True)),  # 256 x 384 exactly
    (300, 451, 256, (256, 384, False)),  # 384.85 -> 384
    (90, 135, 64, (64, 128, False)),  # 96 -> round(1.5) = 2 -> 128
    (10, 1000, 256, (256, 25600, True)),
])
def test_resize_shape(h, w, res, expected):
    assert pp.resize_shape(h, w, res) == expected


def test_resize_image_uses_lanczos_up_and_area_down():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 75, 3), dtype=np.uint8)
    up = pp.resize_image(img, 128)
    assert up.shape == (128, 192, 3)
    assert np.array_equal(up, cv2.resize(img, (192, 128), interpolation=cv2.INTER_LANCZOS4))
    big = rng.integers(0, 256, (300, 450, 3), dtype=np.uint8)
    down = pp.resize_image(big, 128)
    assert np.array_equal(down, cv2.resize(big, (192, 128), interpolation=cv2.INTER_AREA))


def test_canny_map_and_control_tensor():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 255  # one vertical edge
    edges = pp.canny_map(img, 100, 200)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[:, 31:33].any() and not edges[:, :30].any()
    control = pp.control_tensor(edges, 2)
    assert control.shape == (2, 3, 64, 64) and control.dtype == torch.float32
    assert torch.equal(control[1], torch.from_numpy(edges).permute(2, 0, 1).float() / 255.0)


def test_canny_is_independent_of_channel_order(photo):
    _, rgb = pp.prepare(photo, 64, 100, 200)
    _, bgr = pp.prepare(photo[:, :, ::-1].copy(), 64, 100, 200)
    assert np.array_equal(rgb, bgr)


def test_load_image_roundtrip_and_keeps_alpha(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert pp.load_image(tmp_path / "a.png").shape == (4, 5, 4)
    cv2.imwrite(str(tmp_path / "g.png"), np.zeros((4, 5), np.uint8))
    assert pp.load_image(tmp_path / "g.png").shape == (4, 5)


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "image file not found"),
    (lambda p: p.write_bytes(b""), "image file is empty"),
    (lambda p: p.write_text("not an image at all"), "cannot decode image file"),
    (lambda p: cv2.imwrite(str(p), np.zeros((4, 4), np.uint16) + 1000), "dtype uint16; only 8-bit"),
])
def test_load_image_errors(tmp_path, make, message):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(InputError, match=message):
        pp.load_image(path)


@pytest.mark.parametrize("array,message", [
    (np.zeros((0, 5, 3), np.uint8), "zero size"),
    (np.zeros((5, 5, 3), np.float32), "only 8-bit"),
    (np.zeros((5, 5, 2), np.uint8), "expected HxW or HxWxC"),
    ([[1, 2]], "must be a numpy array"),
])
def test_check_image_errors(array, message):
    with pytest.raises(InputError, match=message):
        pp.check_image(array)


def test_find_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in pp.find_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]
    with pytest.raises(InputError, match="input folder not found"):
        pp.find_images(tmp_path / "missing")
