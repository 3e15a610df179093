"""Atomic writes: the final file appears whole or not at all, with the permissions open() gives."""
import os
import stat

import numpy as np
import pytest

from sdcn_trt.cache import atomic_path, current_umask
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
