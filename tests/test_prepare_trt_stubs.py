"""scripts/prepare_trt_stubs.py: --help, the mended copy, and a folder it did not write left alone."""
import ast
import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_trt_stubs.py"
STUBS_INSTALLED = (Path(sysconfig.get_paths()["purelib"]) / "tensorrt" / "__init__.pyi").is_file()


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_trt_stubs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_prints_usage_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: prepare_trt_stubs.py [-h] out")
    assert list(tmp_path.iterdir()) == []  # --help was once taken for the output folder and created


def test_a_folder_it_did_not_write_is_refused_untouched(tmp_path):
    out = tmp_path / "venv"
    (out / "lib").mkdir(parents=True)
    (out / "tensorrt").mkdir()
    with pytest.raises(SystemExit, match=r"venv holds lib, not only tensorrt and tensorrt_bindings; give a new "
                                         r"folder or one this script wrote"):
        load_script().main(out)
    assert sorted(p.name for p in out.iterdir()) == ["lib", "tensorrt"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(SystemExit, match="notes.txt holds notes.txt"):
        load_script().main(a_file)
    assert a_file.read_text() == "keep"


@pytest.mark.skipif(not STUBS_INSTALLED, reason="tensorrt-stubs is not installed (scripts/install.sh installs it)")
def test_the_copy_parses_and_its_own_output_is_replaced(tmp_path):
    script = load_script()
    out = tmp_path / "trt-stubs"
    script.main(out)
    stubs = list(out.rglob("*.pyi"))
    assert stubs and sorted(p.name for p in out.iterdir()) == ["tensorrt", "tensorrt_bindings"]
    for stub in stubs:
        ast.parse(stub.read_text(), filename=str(stub))
    (out / "tensorrt" / "stale.pyi").write_text("x: int\n")
    script.main(out)  # an earlier output of the script: replaced
    assert not (out / "tensorrt" / "stale.pyi").exists()


def test_mend_def_renames_in_and_defaults_later_parameters():
    mend = load_script().mend_def
    assert mend("    def f(self, in: list[int], a: int = 1, b: str) -> None:\n") == \
        "    def f(self, in_: list[int], a: int = 1, b: str = ...) -> None:\n"
    assert mend("    x = 1\n") == "    x = 1\n"
