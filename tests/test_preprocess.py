"""Preprocessing as the reference computes it, and input files: reading, 8-bit scaling, folder listing."""
import os
import subprocess
import sys
from pathlib import Path

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
    (lambda p: cv2.imwrite(str(p.with_suffix(".tif")), np.zeros((4, 4), np.int32)) and p.with_suffix(".tif").rename(p),
     "has dtype int32, which OpenCV cannot turn into 8 bits; supported: 8-bit and 16-bit integer images and float"),
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


# -- 16-bit, float, multi-frame files, OpenCV's messages ---------------------------------------------------
def test_16bit_images_are_read_as_cv2_imread_reads_them_in_colour(tmp_path):
    rng = np.random.default_rng(0)
    color = rng.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    for name in ("c.png", "c.tif"):  # libpng keeps the high byte, libtiff rounds v/257: imread's own values
        cv2.imwrite(str(tmp_path / name), color)
        read = pp.read_image(tmp_path / name)
        assert np.array_equal(read.image, cv2.imread(str(tmp_path / name))) and read.image.dtype == np.uint8
        assert read.notes == ("uint16 (16-bit) scaled to 8 bits as cv2.imread does",)
    assert np.array_equal(pp.load_image(tmp_path / "c.png"), (color >> 8).astype(np.uint8))
    gray = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    assert np.array_equal(pp.hwc3(pp.load_image(tmp_path / "g.png")), cv2.imread(str(tmp_path / "g.png")))
    rgba = rng.integers(0, 65536, (6, 7, 4), dtype=np.uint16)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 65535
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    image = pp.load_image(tmp_path / "a.png")  # alpha kept for hwc3, scaled to 0..255
    assert image.shape == (6, 7, 4) and np.array_equal(image[..., :3], cv2.imread(str(tmp_path / "a.png")))
    assert np.array_equal(image[..., 3], np.rint(rgba[..., 3] / 257.0).astype(np.uint8))
    assert (image[0, 0, 3], image[0, 1, 3]) == (0, 255)


def test_float_images_are_scaled_from_0_1(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 1.2, -0.1, np.nan, 0.2]], np.float32)  # (1, 7)
    image = np.stack([values, values * 0.5, values * 0.4], axis=-1)  # (1, 7, 3)
    cv2.imwrite(str(tmp_path / "f.tif"), image)
    assert cv2.imread(str(tmp_path / "f.tif")) is None  # what the contest's cv2.imread does with it
    read = pp.read_image(tmp_path / "f.tif")
    assert read.image[0, :, 0].tolist() == [0, 128, 255, 255, 0, 0, 51]
    assert read.image[0, :, 2].tolist() == [0, 51, 102, 122, 0, 0, 20]
    assert read.notes == ("float32 (32-bit) float values 0..1 scaled to 0..255",)


def test_gif_gives_its_first_frame_and_says_how_many_there_were(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (8, 9, 3), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(frames[0]).save(tmp_path / "anim.gif", save_all=True, duration=100, loop=0,
                                    append_images=[Image.fromarray(f) for f in frames[1:]])
    Image.fromarray(frames[0]).save(tmp_path / "still.gif")
    first = np.asarray(Image.open(tmp_path / "anim.gif").convert("RGB"))[:, :, ::-1]  # PIL's first frame, BGR
    animated, still = pp.read_image(tmp_path / "anim.gif"), pp.read_image(tmp_path / "still.gif")
    assert np.array_equal(pp.hwc3(animated.image), first) and animated.notes == ("first of 3 frames",)
    assert np.array_equal(pp.hwc3(still.image), first) and still.notes == ()
    assert [p.name for p in pp.find_images(tmp_path)] == ["anim.gif", "still.gif"]


def test_opencv_messages_go_into_the_error_not_the_terminal(tmp_path, capfd):
    from sdcn_trt.images import read_contest_image

    ok, png = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "cut.png").write_bytes(png.tobytes()[:30])  # the header is cut short
    for read in (pp.load_image, read_contest_image):
        with pytest.raises(InputError) as info:
            read(tmp_path / "cut.png")
        assert str(info.value).startswith(f"cannot decode image file {tmp_path / 'cut.png'}: not an image")
        assert "(OpenCV: " in str(info.value) and "IHDR chunk shall be first" in str(info.value)
    out, err = capfd.readouterr()
    assert "IHDR" not in out + err and "grfmt_png" not in out + err


def test_native_stderr_collects_fd_2_and_restores_it(capfd):
    with pp.native_stderr() as lines:
        os.write(2, b"[ WARN:0@0.064] global grfmt_png.cpp:793 readFromStreamOrBuffer PNG input is short\n")
        os.write(2, b"from C\n\nfrom C\n")
    os.write(2, b"after\n")
    assert lines == ["PNG input is short", "from C"]
    assert capfd.readouterr().err == "after\n"
    with pp.native_stderr() as outer:  # nested: each level gets what was written inside it
        os.write(2, b"outer\n")
        with pp.native_stderr() as inner:
            os.write(2, b"inner\n")
    assert (outer, inner) == (["outer"], ["inner"])


def test_native_stderr_without_fd_2_collects_nothing(tmp_path):
    """A process started with fd 2 closed (a daemon) still reads images: nothing to collect, no error."""
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 5, 3), np.uint8))
    code = ("import os, sys; from sdcn_trt import preprocess as pp\n"
            "with pp.native_stderr() as lines: pass\n"
            f"print(lines, pp.load_image({str(tmp_path / 'a.png')!r}).shape, sys.stderr)")
    root = Path(pp.__file__).parents[1]
    done = subprocess.run(["bash", "-c", f'exec 2>&-; exec "{sys.executable}" -c "$0"', code], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[] (4, 5, 3) None", done.stdout + done.stderr


# -- listing folders: every entry accounted for ---------------------------------------------------------------
def test_scan_folder_gives_every_entry_a_reason(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "locked").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.webp", "notes.txt", "README", "secret.png", "locked/d.png"):
        (tmp_path / name).write_bytes(b"x")
    os.symlink("loop_b.png", tmp_path / "loop_a.png")
    os.symlink("loop_a.png", tmp_path / "loop_b.png")
    os.symlink("gone.png", tmp_path / "broken.png")
    os.symlink("a.png", tmp_path / "alias.png")
    os.symlink("..", tmp_path / "sub" / "up")
    os.mkfifo(tmp_path / "pipe.png")
    access, listdir = os.access, os.listdir
    monkeypatch.setattr(pp.os, "access", lambda p, mode: Path(p).name != "secret.png" and access(p, mode))

    def no_locked(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(pp.os, "listdir", no_locked)
    found = {str(e.path.relative_to(tmp_path)): e.skip for e in pp.scan_folder(tmp_path)}
    suffixes = " ".join(pp.IMAGE_SUFFIXES)
    assert found == {
        "a.png": None, "alias.png": None, "b.JPG": None, "sub/c.webp": None,
        "notes.txt": f"not an image file name (extension '.txt'; images end in {suffixes})",
        "README": f"not an image file name (no extension; images end in {suffixes})",
        "secret.png": "unreadable (permission denied)",
        "locked": "an unreadable folder (Permission denied)",
        "loop_a.png": "a looping link (links that point at each other, never at a file)",
        "loop_b.png": "a looping link (links that point at each other, never at a file)",
        "broken.png": "a broken link (to gone.png, which does not exist)",
        "sub/up": "a link to a folder already listed (entering it would loop)",
        "pipe.png": "not a regular file (a FIFO)",
    }
    flat = {str(e.path.relative_to(tmp_path)): e.skip for e in pp.scan_folder(tmp_path, recursive=False)}
    assert flat["sub"] == "a folder (not entered: recursion is off)" and "sub/c.webp" not in flat


def test_find_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in pp.find_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]
    with pytest.raises(InputError, match=r"input folder .*missing not found; give a folder of images"):
        pp.find_images(tmp_path / "missing")
