"""Copy tensorrt-stubs' .pyi files to a folder mypy reads as stubs, mending the two kinds of
invalid syntax they contain (a parameter named `in`, and parameters without defaults after ones
with defaults) so that mypy can check sdcn_trt's TensorRT layer against them.

    python scripts/prepare_trt_stubs.py OUT_DIR
"""
from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")  # what the output folder holds, and all it may hold


def split_params(params: str) -> list[str]:
    depth, current, out = 0, "", []
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return out + [current] if current.strip() else out


def mend_def(line: str) -> str:
    match = re.match(r"^(\s*def \w+\()(.*)(\) -> .*:\s*)$", line)
    if not match:
        return line
    params = [re.sub(r"^(\s*)in:", r"\1in_:", p) for p in split_params(match.group(2))]
    seen_default = False
    for i, p in enumerate(params):
        if "=" in p:
            seen_default = True
        elif seen_default and not p.strip().startswith("*"):
            params[i] = p + " = ..."
    return match.group(1) + ",".join(params) + match.group(3)


def main(out: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in PACKAGES) if out.is_dir() else [out.name]
        if foreign:  # not an earlier output of this script: never delete it
            raise SystemExit(f"prepare_trt_stubs.py: {out} holds {', '.join(foreign[:5])}, not only "
                             f"{' and '.join(PACKAGES)}; give a new folder or one this script wrote "
                             f"(e.g. .venv/trt-stubs)")
        shutil.rmtree(out)
    for package in PACKAGES:
        shutil.copytree(site / package, out / package)
    for stub in out.rglob("*.pyi"):
        text = "".join(mend_def(line) for line in stub.read_text().splitlines(keepends=True))
        ast.parse(text, filename=str(stub))  # fail loudly if anything is still invalid
        stub.write_text(text)


def parse_args(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path,
                        help="folder for the mended stubs, replaced when this script wrote it (e.g. .venv/trt-stubs)")
    return parser.parse_args(argv).out


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
