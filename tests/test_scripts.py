"""The install and CI scripts' own checks."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_disk_short_of_room_is_named_before_an_install_starts(tmp_path):
    """scripts/need_disk.sh warns (and only warns) when the folder's disk has less free than asked."""
    short = subprocess.run(["bash", str(ROOT / "scripts" / "need_disk.sh"), "999999", "a fresh install"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 0 and short.stdout == ""
    assert short.stderr.startswith("warning: only ") and short.stderr.endswith("; a fresh install needs about 999999 GiB\n")
    roomy = subprocess.run(["bash", str(ROOT / "scripts" / "need_disk.sh"), "0", "a fresh install"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert roomy.returncode == 0 and roomy.stderr == ""
