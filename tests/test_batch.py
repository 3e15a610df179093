"""Batch runs: prompt files, manifest, resume after SIGKILL, bad inputs, locking, and Ray."""
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from sdcn_trt import GenerationConfig, InputError
from sdcn_trt.batch.local import MANIFEST, BatchSettings, OutputLock, read_prompts, run_batch

FAST = GenerationConfig(image_resolution=64, ddim_steps=2)


def write_photos(folder, photo, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.roll(photo, 7 * i, axis=1))


def manifest(folder):
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def test_prompt_files(tmp_path):
    (tmp_path / "p.csv").write_text("file,prompt,n_prompt,seed\na.png,a cat,ugly,5\nsub/b.png,a dog,,\n")
    assert read_prompts(tmp_path / "p.csv") == {"a.png": {"prompt": "a cat", "n_prompt": "ugly", "seed": 5},
                                                 "sub/b.png": {"prompt": "a dog"}}
    (tmp_path / "p.jsonl").write_text('{"file": "a.png", "prompt": "x", "negative_prompt": "y", "seed": 1}\n\n')
    assert read_prompts(tmp_path / "p.jsonl") == {"a.png": {"prompt": "x", "n_prompt": "y", "seed": 1}}
    (tmp_path / "bad.csv").write_text("file,prompt,seed\n,x,1\nb.png,y,abc\nc.png,z,-4\nd.png,w,1\nd.png,v,2\n")
    with pytest.raises(InputError, match=r"bad rows in .*line 2: no 'file'; line 3: seed 'abc' is not an integer; "
                                         r"line 4: seed -4 is outside 0..4294967295; line 6: d.png appears twice"):
        read_prompts(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"file": "a.png"}\n{oops\n')
    with pytest.raises(InputError, match="bad.jsonl:2: not valid JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(InputError, match="prompt file must be .csv or .jsonl"):
        read_prompts(tmp_path / "p.txt")
    with pytest.raises(InputError, match="prompt file not found"):
        read_prompts(tmp_path / "none.csv")


def test_batch_run_resume_and_prompts(tiny_pipe, tmp_path, photo, caplog):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_photos(inputs, photo, ["a.png", "b.jpg"])
    write_photos(inputs / "sub", photo, ["c.png"])
    (tmp_path / "p.csv").write_text("file,prompt,seed\nb.jpg,a dog,7\nsub/c.png,a house,8\nmissing.png,x,1\n")
    settings = BatchSettings(str(inputs), str(out), prompts=str(tmp_path / "p.csv"), save_control=True, generation=FAST)
    summary = run_batch(tiny_pipe, settings)
    assert (summary.total, summary.done, summary.skipped, summary.failed) == (3, 3, 0, 0)
    assert "names 1 images that are not in" in caplog.text and "missing.png" in caplog.text
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "a.png", "a_canny.png", "b.png", "b_canny.png", "sub/c.png", "sub/c_canny.png"]
    records = {r["input"]: r for r in manifest(out)}
    assert records["b.jpg"]["seed"] == 7 and records["b.jpg"]["settings"]["prompt"] == "a dog"
    assert records["a.png"]["seed"] == FAST.seed and records["sub/c.png"]["output"] == "sub/c.png"
    expected = tiny_pipe.run(cv2.imread(str(inputs / "b.jpg")), FAST.replace(prompt="a dog", seed=7)).images[0]
    assert np.array_equal(cv2.imread(str(out / "b.png"))[:, :, ::-1], expected)
    again = run_batch(tiny_pipe, settings)
    assert (again.done, again.skipped) == (0, 3)
    (out / "a.png").unlink()  # a lost output is redone
    changed = run_batch(tiny_pipe, BatchSettings(str(inputs), str(out), generation=FAST.replace(ddim_steps=1)))
    assert changed.done == 3  # other settings: other results


def test_bad_inputs_are_recorded_and_the_batch_goes_on(tiny_pipe, tmp_path, photo):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(100))
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "text.png").write_text("hello")
    cv2.imwrite(str(inputs / "deep.png"), np.full((40, 40, 3), 40000, np.uint16))
    cv2.imwrite(str(inputs / "gray.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY))
    cv2.imwrite(str(inputs / "rgba.png"), np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)]))
    Image.new("CMYK", (96, 64), (0, 255, 0, 0)).save(inputs / "cmyk.jpg")
    cv2.imwrite(str(inputs / "tiny.png"), photo[:3, :4])
    cv2.imwrite(str(inputs / "huge.jpg"), cv2.resize(photo, (4000, 2700)))
    summary = run_batch(tiny_pipe, BatchSettings(str(inputs), str(out), generation=FAST))
    records = {r["input"]: r for r in manifest(out)}
    assert summary.failed == 3 and summary.done == 6
    assert records["corrupt.jpg"]["error"].startswith("cannot decode image file")
    assert records["empty.png"]["error"].startswith("image file is empty")
    assert records["text.png"]["error"].startswith("cannot decode image file")
    assert records["deep.png"]["notes"] == ["uint16 (16-bit) scaled to 8 bits as cv2.imread does"]
    for name in ("gray", "rgba", "cmyk", "tiny", "huge", "deep"):
        assert records[f"{name}.{'jpg' if name in ('cmyk', 'huge') else 'png'}"]["status"] == "done"
    assert cv2.imread(str(out / "huge.png")).shape == (64, 64, 3)  # 2700 x 4000 -> 64 x round(1.48) * 64
    assert cv2.imread(str(out / "tiny.png")).shape == (64, 64, 3)


def test_every_file_gets_a_manifest_row(tiny_pipe, tmp_path, photo, capfd):
    """The awkward folder a new user tried: every file is done, failed or skipped with its reason, the
    summary counts them all, and OpenCV's own complaints reach the row, not the terminal."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_photos(inputs, photo[:64, :64], ["a.png"])
    frames = [Image.fromarray(np.roll(photo[:64, :64], 9 * i, axis=0)) for i in range(3)]
    frames[0].save(inputs / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cv2.imwrite(str(inputs / "deep.tif"), (photo[:64, :64].astype(np.float32) / 255.0))
    ok, png = cv2.imencode(".png", photo)
    (inputs / "cut.png").write_bytes(png.tobytes()[:30])
    (inputs / "notes.txt").write_text("captions")
    (inputs / "sub").mkdir()
    os.symlink("loop_b.png", inputs / "loop_a.png")
    os.symlink("loop_a.png", inputs / "loop_b.png")
    os.symlink("gone.jpg", inputs / "sub" / "broken.jpg")
    every_file = {str(p.relative_to(inputs)) for p in inputs.rglob("*") if not p.is_dir()}
    settings = BatchSettings(str(inputs), str(out), generation=FAST)
    summary = run_batch(tiny_pipe, settings)
    rows = manifest(out)
    records = {r["input"]: r for r in rows}
    assert set(records) == every_file
    assert {name: r["status"] for name, r in records.items()} == {
        "a.png": "done", "anim.gif": "done", "deep.tif": "done", "cut.png": "failed", "notes.txt": "skipped",
        "loop_a.png": "skipped", "loop_b.png": "skipped", "sub/broken.jpg": "skipped"}
    assert records["anim.gif"]["notes"] == ["first of 3 frames"]
    assert records["deep.tif"]["notes"] == ["float32 (32-bit) float values 0..1 scaled to 0..255"]
    assert "(OpenCV: " in records["cut.png"]["error"] and "IHDR chunk shall be first" in records["cut.png"]["error"]
    assert records["loop_a.png"]["reason"] == "a looping link (links that point at each other, never at a file)"
    assert records["sub/broken.jpg"]["reason"] == "a broken link (to gone.jpg, which does not exist)"
    assert records["notes.txt"]["reason"].startswith("not an image file name (extension '.txt'")
    assert (summary.total, summary.done, summary.failed, summary.skipped_files) == (4, 3, 1, 4)
    assert str(summary).startswith("4 images: 3 done, 0 already done, 1 failed; "
                                   "4 other files skipped (see the manifest)")
    printed, err = capfd.readouterr()
    assert "IHDR" not in err and "grfmt_png" not in err  # only in the row (and the "failed:" line)
    assert "skipped: loop_a.png: a looping link" in printed
    again = run_batch(tiny_pipe, settings)  # rows already recorded with the same reason are not repeated
    assert (again.done, again.skipped, again.failed, again.skipped_files) == (0, 3, 1, 4)  # the failed one is retried
    assert len(manifest(out)) == len(rows) + 1


def test_a_folder_without_images_names_what_it_holds(tiny_pipe, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no images found in .*in \(1 other entries: notes.txt: not an image file"):
        run_batch(tiny_pipe, BatchSettings(str(tmp_path / "in"), str(tmp_path / "out"), generation=FAST))


def test_output_folder_problems(tiny_pipe, tmp_path, photo):
    inputs = tmp_path / "in"
    write_photos(inputs, photo, ["a.png"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="output folder .* is not writable"):
        run_batch(tiny_pipe, BatchSettings(str(inputs), str(tmp_path / "file" / "out"), generation=FAST))
    lock = OutputLock(tmp_path / "out")
    try:
        with pytest.raises(InputError, match=rf"another batch run \(pid {os.getpid()}\) is writing to"):
            run_batch(tiny_pipe, BatchSettings(str(inputs), str(tmp_path / "out"), generation=FAST))
    finally:
        lock.release()
    assert run_batch(tiny_pipe, BatchSettings(str(inputs), str(tmp_path / "out"), generation=FAST)).done == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found in"):
        run_batch(tiny_pipe, BatchSettings(str(tmp_path / "empty"), str(tmp_path / "o2"), generation=FAST))
    assert not (tmp_path / "o2").exists()  # nothing written for a job that could not start


def test_sigkill_mid_run_then_resume(tmp_path, photo):
    inputs, out = tmp_path / "in", tmp_path / "out"
    names = [f"img{i:02d}.png" for i in range(10)]
    write_photos(inputs, photo, names)
    cmd = [sys.executable, "-m", "sdcn_trt.cli", "batch", str(inputs), str(out), "--ddim-steps", "4",
           "--image-resolution", "128"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / MANIFEST).is_file() and len((out / MANIFEST).read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [r["input"] for r in manifest(out) if r["status"] == "done"]
    assert 3 <= len(first) < len(names), "the kill must land mid-run"
    for png in out.glob("*.png"):  # nothing half-written under a final name
        assert cv2.imread(str(png)) is not None
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = [r["input"] for r in manifest(out) if r["status"] == "done"]
    assert sorted(done) == names  # every input done exactly once
    assert not list(out.glob(".*.tmp")) and sorted(p.name for p in out.glob("*.png")) == [n for n in names]


def test_ray_matches_local(tiny_pipe, tmp_path, photo):
    pytest.importorskip("ray")
    import functools

    from sdcn_trt.cli import build_parser, load_pipeline
    from sdcn_trt.batch.ray import RayRunner

    inputs = tmp_path / "in"
    write_photos(inputs, photo, ["a.png", "b.png", "c.png"])
    local = run_batch(tiny_pipe, BatchSettings(str(inputs), str(tmp_path / "local"), generation=FAST))
    args = build_parser().parse_args(["batch", str(inputs), str(tmp_path / "ray")])
    runner = RayRunner(functools.partial(load_pipeline, args), workers=2, chunk_size=1)
    try:
        remote = run_batch(None, BatchSettings(str(inputs), str(tmp_path / "ray"), generation=FAST), runner)
    finally:
        runner.shutdown()
    assert local.done == remote.done == 3
    for name in ("a.png", "b.png", "c.png"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()


def crash_first_run(marker, args):
    """A pipeline whose first run anywhere kills its process (a worker lost mid-task)."""
    from sdcn_trt.cli import load_pipeline

    pipe = load_pipeline(args)
    real_run = pipe.run

    def run(image, config, **kwargs):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return real_run(image, config, **kwargs)

    pipe.run = run
    return pipe


def test_ray_retries_a_chunk_whose_worker_died(tmp_path, photo):
    ray = pytest.importorskip("ray")
    import functools

    from sdcn_trt.cli import build_parser
    from sdcn_trt.batch.ray import RayRunner

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests
    inputs = tmp_path / "in"
    write_photos(inputs, photo, ["a.png", "b.png"])
    args = build_parser().parse_args(["batch", str(inputs), str(tmp_path / "out")])
    runner = RayRunner(functools.partial(crash_first_run, str(tmp_path / "crashed"), args), workers=1, chunk_size=2)
    try:
        summary = run_batch(None, BatchSettings(str(inputs), str(tmp_path / "out"), generation=FAST), runner)
    finally:
        runner.shutdown()
    assert (tmp_path / "crashed").exists()  # the worker did die once
    assert summary.done == 2 and summary.failed == 0
    assert sorted(r["input"] for r in manifest(tmp_path / "out")) == ["a.png", "b.png"]


def crash_every_run(args):
    """A pipeline whose every run kills its process."""
    from sdcn_trt.cli import load_pipeline

    pipe = load_pipeline(args)
    pipe.run = lambda image, config, **kwargs: os._exit(1)
    return pipe


def test_ray_records_the_jobs_of_a_chunk_that_fails_every_try(tiny_pipe, tmp_path, photo):
    ray = pytest.importorskip("ray")
    import functools

    from sdcn_trt.cli import build_parser
    from sdcn_trt.batch.ray import RayRunner

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_photos(inputs, photo, ["a.png", "b.png"])
    args = build_parser().parse_args(["batch", str(inputs), str(out)])
    runner = RayRunner(functools.partial(crash_every_run, args), workers=1, chunk_size=1, max_retries=1)
    try:
        summary = run_batch(None, BatchSettings(str(inputs), str(out), generation=FAST), runner)
    finally:
        runner.shutdown()
    assert (summary.done, summary.failed) == (0, 2)
    records = manifest(out)
    assert sorted(r["input"] for r in records) == ["a.png", "b.png"] and not list(out.glob("*.png"))
    for r in records:
        assert r["status"] == "failed"
        assert r["error"] == ("no result from Ray: its chunk failed 2 times, or no live worker was left to run it "
                              "(errors: ActorDiedError)")
    again = run_batch(tiny_pipe, BatchSettings(str(inputs), str(out), generation=FAST))
    assert (again.done, again.skipped) == (2, 0)  # failed jobs are redone on the next run


def test_oversized_input_is_recorded_and_the_batch_goes_on(tiny_pipe, tmp_path, photo):
    """A 64x2000 photo resizes to 64x1984 at resolution 64, past max_side=512: refused before any compute,
    recorded with the size it would have had; the other images are done."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_photos(inputs, photo, ["ok.png"])
    cv2.imwrite(str(inputs / "thin.png"), np.zeros((64, 2000, 3), np.uint8))
    summary = run_batch(tiny_pipe, BatchSettings(str(inputs), str(out), generation=FAST.replace(max_side=512)))
    assert (summary.done, summary.failed) == (1, 1)
    records = {r["input"]: r for r in manifest(out)}
    assert records["ok.png"]["status"] == "done"
    assert records["thin.png"]["status"] == "failed"
    assert "image 64x2000 resizes to 64x1984: its long side exceeds max_side=512" in records["thin.png"]["error"]
