"""Batch runs with --batch-size: files of one size and settings share network calls; manifest, resume and
per-file errors stay as with one call per file."""
import json

import cv2
import numpy as np
import pytest

from sdcn_trt import GenerationConfig, InputError
from sdcn_trt.batch.local import MANIFEST, BatchSettings, Job, group_key, run_batch
from tests.conftest import pixel_diff

FAST = GenerationConfig(image_resolution=64, ddim_steps=2)


def manifest(folder):
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def count_calls(pipe):
    """Wrap pipe.run_batch and pipe.run to record the photos of each call (a black photo fails both, as a
    file the pipeline refuses would); returns the list it fills."""
    calls = []
    run_batch, run = pipe.run_batch, pipe.run

    def check(image):
        if not image.any():
            raise InputError("a black photo (test)")

    def batched(items, config, **kwargs):
        calls.append(len(items))
        for item in items:
            check(item.image)
        return run_batch(items, config, **kwargs)

    def single(image, config, **kwargs):
        calls.append(1)
        check(image)
        return run(image, config, **kwargs)

    pipe.run_batch, pipe.run = batched, single
    return calls


@pytest.fixture
def folder(tmp_path, photo):
    """Five photos at 64x128 after resizing (one black, which count_calls fails), one at 64x64, a corrupt file
    and one too long to run."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.jpg", "d.png"]):
        cv2.imwrite(str(inputs / name), np.roll(photo, 9 * i, axis=1))
    cv2.imwrite(str(inputs / "black.png"), np.zeros_like(photo))
    cv2.imwrite(str(inputs / "square.png"), photo[:, :90])
    cv2.imwrite(str(inputs / "long.png"), cv2.resize(photo, (3200, 64)))  # resizes to 64x3200 > max_side 2048
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0not a jpeg")
    (tmp_path / "p.csv").write_text("file,prompt,seed\nb.png,a dog,7\nd.png,a house,8\n")
    return inputs


def test_grouped_run_matches_one_call_per_file(tmp_path, tiny, folder):
    from sdcn_trt import ControlNetPipeline

    pipe = ControlNetPipeline(tiny, "torch")
    calls = count_calls(pipe)
    prompts = str(tmp_path / "p.csv")
    grouped = run_batch(pipe, BatchSettings(str(folder), str(tmp_path / "grouped"), prompts=prompts, generation=FAST,
                                            batch_size=3))
    assert (grouped.total, grouped.done, grouped.failed) == (8, 5, 3)
    # sorted: a.png b.png black.png fill a group of 3, which fails on black.png: each runs alone; then c.jpg d.png
    # (a group of 2), long.png and square.png alone
    assert calls == [3, 1, 1, 1, 2, 1, 1]
    calls.clear()
    single = run_batch(pipe, BatchSettings(str(folder), str(tmp_path / "single"), prompts=prompts, generation=FAST))
    assert (single.done, single.failed, calls) == (5, 3, [1] * 7)  # corrupt.jpg fails before any call
    by_grouped = {r["input"]: r for r in manifest(tmp_path / "grouped")}
    by_single = {r["input"]: r for r in manifest(tmp_path / "single")}
    assert set(by_grouped) == set(by_single)
    for name, record in by_grouped.items():
        other = by_single[name]
        assert {k: record.get(k) for k in ("key", "status", "seed", "settings", "output")} == \
               {k: other.get(k) for k in ("key", "status", "seed", "settings", "output")}
        if record["status"] == "done":
            a, b = (cv2.imread(str(tmp_path / run / record["output"])) for run in ("grouped", "single"))
            assert pixel_diff(a, b).max() <= 1
    assert by_grouped["long.png"]["error"] == by_single["long.png"]["error"]
    assert "long side exceeds max_side" in by_grouped["long.png"]["error"]
    assert by_grouped["corrupt.jpg"]["error"].startswith("cannot decode image file")
    assert by_grouped["black.png"]["error"] == "a black photo (test)"
    assert by_grouped["b.png"]["seed"] == 7
    calls.clear()
    again = run_batch(pipe, BatchSettings(str(folder), str(tmp_path / "grouped"), prompts=prompts, generation=FAST,
                                          batch_size=3))
    assert (again.done, again.skipped, again.failed) == (0, 5, 3)  # resume: only the failed files are retried
    assert calls == [1, 1]  # black.png and long.png, in one group each (different sizes)


def test_group_key_separates_sizes_and_settings(photo):
    job = Job("a.png", FAST)
    same = [Job("b.png", FAST.replace(prompt="other", n_prompt="x", seed=3)), Job("c.png", FAST)]
    assert {group_key(j, photo) for j in same} == {group_key(job, photo)}
    assert group_key(job, photo[:, :90]) != group_key(job, photo)  # 64x64 vs 64x128
    assert group_key(Job("a.png", FAST.replace(scale=5.0)), photo) != group_key(job, photo)


def test_batch_size_must_be_positive(tmp_path):
    with pytest.raises(InputError, match="batch_size must be an integer >= 1, got 0"):
        BatchSettings(str(tmp_path), str(tmp_path / "out"), batch_size=0)


@pytest.mark.slow
def test_ray_actors_batch_the_same_way(tmp_path, tiny_pipe, folder):
    pytest.importorskip("ray")
    import functools

    from sdcn_trt.batch.ray import RayRunner
    from sdcn_trt.cli import build_parser, load_pipeline

    local = run_batch(tiny_pipe, BatchSettings(str(folder), str(tmp_path / "local"), generation=FAST, batch_size=2))
    args = build_parser().parse_args(["batch", str(folder), str(tmp_path / "ray")])
    runner = RayRunner(functools.partial(load_pipeline, args), workers=1, chunk_size=1)
    try:
        remote = run_batch(None, BatchSettings(str(folder), str(tmp_path / "ray"), generation=FAST, batch_size=2),
                           runner)
    finally:
        runner.shutdown()
    assert (local.done, local.failed) == (remote.done, remote.failed) == (6, 2)
    worst = {}
    for record in manifest(tmp_path / "local"):
        if record["status"] == "done":
            a, b = (cv2.imread(str(tmp_path / run / record["output"])) for run in ("local", "ray"))
            worst[record["input"]] = int(pixel_diff(a, b).max())
    # the same groups in both; a batched call in a Ray worker (other OpenMP settings) may round differently
    assert max(worst.values()) <= 1, worst


def test_cli_flags_reach_the_settings(tmp_path):
    from sdcn_trt.cli import backend_config, build_parser

    parser = build_parser()
    args = parser.parse_args(["batch", "in", "out", "--batch-size", "4", "--backend", "tensorrt", "--num-samples", "2"])
    assert args.batch_size == 4 and backend_config(args).max_batch == 8  # engines for 4 photos x 2 samples
    args = parser.parse_args(["batch", "in", "out", "--batch-size", "4", "--max-batch", "2"])
    assert backend_config(args).max_batch == 2  # given: kept (calls are capped at it)
    args = parser.parse_args(["score", "--batch-size", "8"])
    assert args.batch_size == 8 and backend_config(args).max_batch == 8
    assert backend_config(parser.parse_args(["score"])).max_batch is None


def test_score_throughput_line(tiny_pipe, photo):
    from sdcn_trt.scoring.report import summary_table
    from sdcn_trt.scoring.run import ScoreSettings, measure_throughput

    t = measure_throughput(tiny_pipe, [photo, photo[:, ::-1].copy(), photo], FAST, batch_size=2, warmup=0)
    assert (t["batch_size"], t["images"]) == (2, 3)
    assert t["images_per_s"] == pytest.approx(3 / t["seconds"]) and t["ms_per_image"] == pytest.approx(
        1000 * t["seconds"] / 3)
    summary = {"schedules": {"full": {"images": 3, "errors": 0, "latency_ms": {"mean": 10.0, "p90": 11.0},
                                      "mean_pd": 1.0, "max_pd": 2.0, "pd_failures": 0, "score": 100.0,
                                      "throughput": {**t, "images_per_s": 2.5, "ms_per_image": 400.0}}}}
    assert summary_table(summary).splitlines()[-1] == \
           "throughput full: 2.50 images/s (400.0 ms/image) at batch size 2, 3 photos"
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        ScoreSettings(batch_size=0)


def test_benchmark_batched_table_and_failed_case(tmp_path):
    import argparse

    from benchmarks.batched import batched_markdown, run_batched_case

    row = {"backend": "torch", "precision": "fp32", "cuda_graph": "off", "peak_rss_gib": 1.5, "max_diff_vs_single": 1}
    report = {"steps": 2, "repeats": 3, "batched": [
        {**row, "batch_size": 1, "images_per_s": 2.0, "ms_per_image": 500.0},
        {**row, "batch_size": 4, "images_per_s": 4.0, "ms_per_image": 250.0, "peak_gpu_memory_gib": 3.25},
        {**row, "batch_size": 8, "error": "timed out after 30 s"}]}
    lines = batched_markdown(report).splitlines()
    assert lines[5:8] == ["| torch | fp32 | off | 1 | 2.00 | 500.0 | 1.00x | 1.50 | 1 |",
                          "| torch | fp32 | off | 4 | 4.00 | 250.0 | 2.00x | 3.25 | 1 |",
                          "| torch | fp32 | off | 8 | failed: timed out after 30 s | | | | |"]
    assert batched_markdown({"steps": 2, "repeats": 3}) == ""
    args = argparse.Namespace(device="cpu", preset="tiny", steps=1, repeats=1, sampler="ddim")
    failed = run_batched_case({"backend": "nope", "precision": "fp32", "cuda_graph": "off"}, 2, args, timeout=120)
    assert failed["batch_size"] == 2 and "unknown backend 'nope'" in failed["error"]
