"""Atomic writes: the final file appears whole or not at all, with the permissions open() gives."""
import json
import os
import re
import stat

import numpy as np
import pytest

from sdcn_trt.cache import atomic_path, current_umask
from sdcn_trt.cli import main
from sdcn_trt.errors import InputError
from sdcn_trt.images import save_image


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_written_files_get_the_umask_permissions(tmp_path, umask):
    assert current_umask() == umask
    with open(tmp_path / "plain.txt", "w") as f:  # what any other program would create
        f.write("x")
    image = save_image(tmp_path / "image.png", np.zeros((8, 8, 3), np.uint8))
    mode = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert stat.S_IMODE(os.stat(image).st_mode) == mode == 0o666 & ~umask


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and (tmp_path / "out.bin").read_bytes() == b"whole"


# -- what the cache holds: `sdcn-trt cache` ------------------------------------------------------------------
def _fake_cache(root, outside):
    """A cache with one entry of each situation: usable, made by another torch or Python, unfinished, dangling."""
    import sys

    import torch as torch_module

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (root / "weights" / "abc-fp32").mkdir(parents=True)
    (root / "weights" / "abc-fp32" / "weights.safetensors").write_bytes(b"x" * 1000)
    (root / "onnx" / "unet-fp16-1234").mkdir(parents=True)
    (root / "onnx" / "unet-fp16-1234" / "model.onnx").write_bytes(b"y" * 500)
    for name, version, py in (("now", torch_module.__version__, python), ("old", "1.13.0", python),
                              ("oldpy", torch_module.__version__, "3.9")):
        folder = root / "torch_compile" / name
        folder.mkdir(parents=True)
        (folder / "key.json").write_text(json.dumps({"torch": version, "python": py, "triton": None,
                                                     "device": {"type": "cpu", "model": "test"}}))
    (root / "inductor" / "fused_step-fp16-aaaa").mkdir(parents=True)
    (root / "inductor" / "fused_step-fp16-aaaa" / "meta.json").write_text(json.dumps(
        {"parts": {"torch": "1.13.0+cu117", "device": {"type": "cuda", "name": "NVIDIA H200"}}}))
    (root / "inductor" / ".fused_step-fp16-bbbb.x1y2").mkdir()  # a build that never finished: hours old
    os.utime(root / "inductor" / ".fused_step-fp16-bbbb.x1y2", (0, os.path.getmtime(root) - 7 * 3600))
    (root / "inductor" / ".fused_step-fp16-cccc.x3y4").mkdir()  # a build in progress in another process
    (root / "hashes").mkdir()
    (root / "hashes" / "gone.json").write_text(json.dumps({"path": str(root / "nowhere.pth"), "stat": [1, 2, 3, 4],
                                                           "sha256": "0" * 64}))
    (root / "engines").mkdir()
    (root / "engines" / "link.plan").symlink_to(outside)


def test_the_cache_listing_says_what_this_install_can_no_longer_use(tmp_path):
    from sdcn_trt.cache import cache_entries

    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"keep me")
    _fake_cache(tmp_path / "cache", outside)
    entries = {(e.kind, e.path.name): e for e in cache_entries(tmp_path / "cache")}
    stale = {key: e.stale for key, e in entries.items() if e.stale}
    assert set(stale) == {("torch.compile", "old"), ("torch.compile", "oldpy"), ("inductor", "fused_step-fp16-aaaa"),
                          ("inductor", ".fused_step-fp16-bbbb.x1y2"), ("file hashes", "gone.json")}
    assert stale[("torch.compile", "old")].startswith("made by torch 1.13.0")
    assert stale[("inductor", "fused_step-fp16-aaaa")].startswith("compiled by torch 1.13.0+cu117")
    assert "unfinished write" in stale[("inductor", ".fused_step-fp16-bbbb.x1y2")]
    assert entries[("weights", "abc-fp32")].bytes == 1000 and entries[("onnx", "unet-fp16-1234")].bytes == 500
    assert entries[("inductor", "fused_step-fp16-aaaa")].made_for == "torch 1.13.0+cu117, NVIDIA H200"


def test_cache_command_lists_and_removes_only_inside_the_cache(tmp_path, capsys):
    from sdcn_trt.cache import CacheEntry, remove_cache_entries

    root, outside = tmp_path / "cache", tmp_path / "precious.bin"
    outside.write_bytes(b"keep me")
    _fake_cache(root, outside)
    assert main(["cache", "--cache-dir", str(root), "--entries"]) == 0
    listed = capsys.readouterr().out
    assert f"cache: {root}" in listed and "stale: made by torch 1.13.0" in listed
    assert re.search(r"^torch\.compile\s+3\s+[\d.]+ MB\s+2$", listed, re.M)
    assert main(["cache", "--cache-dir", str(root), "--remove-stale"]) == 0
    assert "removed 5 entries" in capsys.readouterr().out
    left = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))
    assert left == ["engines/link.plan", "inductor/.fused_step-fp16-cccc.x3y4", "onnx/unet-fp16-1234",
                    "torch_compile/now", "weights/abc-fp32"]
    assert main(["cache", "--cache-dir", str(root), "--remove", "tensorrt", "onnx"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert outside.read_bytes() == b"keep me" and not (root / "engines" / "link.plan").exists()  # the link, not its target
    with pytest.raises(InputError, match="is not inside the cache"):
        remove_cache_entries([CacheEntry("weights", root / "weights" / "abc-fp32", 1000),
                              CacheEntry("weights", outside, 7)], root)
    assert (root / "weights" / "abc-fp32").exists() and outside.exists()  # refused before anything was removed
    assert main(["cache", "--cache-dir", str(tmp_path / "missing")]) == 2
    assert "error: --cache-dir" in capsys.readouterr().err
