"""Contest-style scoring entry point: `python scripts/compute_score.py [sdcn-trt score options]`.

Generates the torch fp32 reference images (cached) and the chosen backend's images with the same
seeds, then writes per-image rows, a summary and an HTML report; see `sdcn-trt score --help`.
"""
import sys

from sdcn_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
