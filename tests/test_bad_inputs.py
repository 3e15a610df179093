"""Bad input on the command line: one `error: ...` line naming what was wrong and what is valid, exit
code 2, no traceback, and nothing written (checked before any weights load where the flags tell)."""
import os

import cv2
import numpy as np
import pytest

from sdcn_trt import InputError
from sdcn_trt.cli import main


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if a command loads a model: the error it checks must come before that."""
    import sdcn_trt.cli_options as cli_options

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(cli_options, "load_base_components", refuse)


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


# -- output folders ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["generate", "{photo}", "-o", "{out}"],
    ["batch", "{photos}", "{out}"],
    ["score", "{photos}", "-o", "{out}", "--random-fid"],
    ["tune", "{photos}", "-o", "{out}", "--random-fid"],
    ["export", "--networks", "vae_decoder", "-o", "{out}"],
    ["demo", "-o", "{out}", "--preset", "tiny"],
    ["contest-kit", "{out}"],
])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, photo_file, capsys, no_weights,
                                                                     command):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    args = [a.format(photo=photo_file, photos=photo_file.parent, out=blocker / "sub") for a in command]
    assert main(args) == 2
    flag = "folder" if command[0] == "contest-kit" else "output_dir" if command[0] == "batch" else "--output"
    assert one_error(capsys) == (f"error: {flag} {blocker / 'sub'} is not a folder ({blocker} is a file); "
                                 "give a folder (created if missing)")
    assert blocker.read_text() == "keep me"


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, photo_file, capsys, no_weights, monkeypatch):
    import sdcn_trt.images

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access  # root may write anywhere: say no for this folder as a read-only mount would
    monkeypatch.setattr(sdcn_trt.images.os, "access", lambda p, mode: False if p == read_only else real_access(p, mode))
    assert main(["generate", str(photo_file), "-o", str(read_only / "out")]) == 2
    assert one_error(capsys) == (f"error: --output {read_only / 'out'} is not writable ({read_only} is read-only); "
                                 "give a folder you can write into")
    assert list(read_only.iterdir()) == []


def test_a_cache_dir_that_is_a_file_is_refused(tmp_path, capsys, no_weights):
    blocker = tmp_path / "cache"
    blocker.write_text("")
    assert main(["export", "--networks", "vae_decoder", "--cache-dir", str(blocker)]) == 2
    assert one_error(capsys) == f"error: --cache-dir {blocker} is not a folder; give a folder (created if missing)"


def test_an_image_that_cannot_be_written_is_an_input_error_naming_it(tmp_path):
    from sdcn_trt.images import save_image, write_contest_image

    (tmp_path / "taken").write_text("")
    with pytest.raises(InputError) as raised:
        save_image(tmp_path / "taken" / "cat.png", np.zeros((8, 8, 3), np.uint8))
    assert str(raised.value) == f"cannot write {tmp_path / 'taken' / 'cat.png'}: File exists ({tmp_path / 'taken'})"
    with pytest.raises(InputError, match="cannot write .*cat.jpg: File exists"):
        write_contest_image(tmp_path / "taken" / "cat.jpg", np.zeros((8, 8, 3), np.uint8))
    assert (tmp_path / "taken").read_text() == ""


def test_an_os_error_no_check_caught_is_one_line_and_exit_code_2(tmp_path, photo_file, capsys, monkeypatch):
    import sdcn_trt.cli as cli

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "cat.png"))

    monkeypatch.setattr(cli, "load_pipeline", full_disk)
    assert main(["generate", str(photo_file), "-o", str(tmp_path / "out")]) == 2
    assert one_error(capsys) == (f"error: No space left on device: {tmp_path / 'out' / 'cat.png'} "
                                 "(-v shows where it happened)")


# -- input files ---------------------------------------------------------------------------------------
def test_an_unreadable_image_is_one_clear_error(photo_file, capsys, no_weights, monkeypatch):
    def denied(path, dtype):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(np, "fromfile", denied)  # (chmod 000 does not stop root)
    assert main(["generate", str(photo_file)]) == 2
    assert one_error(capsys) == f"error: cannot read image file {photo_file}: Permission denied"


def test_generate_on_a_folder_without_images_is_an_error_not_a_no_op(tmp_path, capsys, no_weights):
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert one_error(capsys) == f"error: no images found in {tmp_path / 'empty'}"
    (tmp_path / "empty" / "notes.txt").write_text("")
    assert main(["generate", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert one_error(capsys).startswith(f"error: no images found in {tmp_path / 'empty'} (1 other entries: "
                                        "notes.txt: not an image file name (extension '.txt'; images end in .png")
    assert not (tmp_path / "out").exists()


def test_generate_refuses_to_write_an_output_over_its_input(tmp_path, photo_file, capsys, no_weights):
    png = photo_file.with_suffix(".png")
    png.write_bytes(photo_file.read_bytes())
    before = png.read_bytes()
    assert main(["generate", str(png), "-o", str(png.parent)]) == 2
    assert one_error(capsys) == (f"error: the output of {png} would be written over the input itself "
                                 f"({png.parent} is its folder); give another output folder")
    assert png.read_bytes() == before


# -- batch ---------------------------------------------------------------------------------------------
def test_batch_refuses_an_output_folder_that_is_or_is_inside_the_input_folder(photo_file, capsys, no_weights):
    photos = photo_file.parent
    assert main(["batch", str(photos), str(photos)]) == 2
    assert one_error(capsys) == (f"error: output folder {photos} is the input folder: an input .png would be "
                                 "overwritten by its own output, and the outputs read as inputs by the next run; "
                                 "give another output folder")
    assert main(["batch", str(photos), str(photos / "out")]) == 2
    assert one_error(capsys) == (f"error: output folder {photos / 'out'} is inside the input folder {photos}: the next "
                                 "run would read its outputs as inputs; give an output folder outside it, or pass "
                                 "--no-recursive")
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg"]


def test_batch_refuses_files_that_would_write_one_output(photo_file, capsys, no_weights, tmp_path):
    other = photo_file.with_suffix(".png")
    other.write_bytes(photo_file.read_bytes())
    assert main(["batch", str(photo_file.parent), str(tmp_path / "out")]) == 2
    assert one_error(capsys) == (f"error: inputs would overwrite each other's outputs: {photo_file}, {other} -> "
                                 "cat.png; rename them or run them apart")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["{file}", "{out}"], "error: input folder {file} is a file, not a folder; give a folder of images"),
    (["{missing}", "{out}"], "error: input folder {missing} not found; give a folder of images"),
    (["{photos}", "{out}", "--prompts", "{missing}.csv"], "error: prompt file not found: {missing}.csv"),
])
def test_batch_checks_its_inputs_before_the_weights_load(photo_file, capsys, no_weights, tmp_path, flags, message):
    names = dict(file=photo_file, missing=tmp_path / "missing", photos=photo_file.parent, out=tmp_path / "out")
    assert main(["batch", *[f.format(**names) for f in flags]]) == 2
    assert one_error(capsys) == message.format(**names)
    assert not (tmp_path / "out").exists()


# -- score and tune ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["score", "tune"])
@pytest.mark.parametrize("flags,message", [
    (["{empty}"], "error: no images found in {empty}"),
    (["{file}"], "error: input folder {file} is a file, not a folder; give a folder of images"),
    (["{photos}", "--random-fid", "--fid-weights", "{file}"],
     "error: give fid_weights (the contest's PD) or random_fid (plumbing only, PD not the contest's), not both"),
])
def test_score_and_tune_check_inputs_and_fid_choice_before_the_weights_load(photo_file, capsys, no_weights, tmp_path,
                                                                            command, flags, message):
    (tmp_path / "empty").mkdir()
    names = dict(empty=tmp_path / "empty", file=photo_file, photos=photo_file.parent)
    assert main([command, *[f.format(**names) for f in flags], "-o", str(tmp_path / "out")]) == 2
    assert one_error(capsys) == message.format(**names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--warmup", "-1"], "error: warmup must be an integer >= 0, got -1"),
    (["--reference-dir", "{missing}"], "error: reference_dir {missing} is not a folder; give the folder of precomputed "
                                       "reference images (matched by file stem), or leave it out to make them here"),
])
def test_score_refuses_bad_settings_that_it_used_to_run_with(photo_file, capsys, no_weights, tmp_path, flags, message):
    """--warmup -1 ran with no warm-up; a missing --reference-dir failed every image one by one, exit code 1."""
    flags = [f.format(missing=tmp_path / "missing") for f in flags]
    assert main(["score", str(photo_file.parent), "-o", str(tmp_path / "out"), "--random-fid", *flags]) == 2
    assert one_error(capsys) == message.format(missing=tmp_path / "missing")
    assert not (tmp_path / "out").exists()


# -- app -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--port", "99999"], "error: port must be in 1..65535, got 99999"),
    (["--max-file-size", "lots"], "error: max_file_size must be a whole number with a unit b, kb, mb, gb or tb "
                                  "(e.g. 20mb), got 'lots'"),
])
def test_app_settings_gradio_would_fail_on_are_refused_before_the_model_loads(capsys, no_weights, flags, message):
    pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'sdcn_trt[app]'")
    assert main(["app", "--preset", "tiny", *flags]) == 2
    assert one_error(capsys) == message


def test_app_on_a_taken_port_is_one_clear_error(capsys):
    import socket

    pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'sdcn_trt[app]'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--preset", "tiny", "--port", str(port)]) == 2
    assert one_error(capsys).startswith(f"error: cannot serve the page on 127.0.0.1:{port}: the port is taken or cannot "
                                        f"be opened here (Cannot find empty port in range: {port}-{port}")


@pytest.mark.parametrize("flags,message", [
    (["--workers", "0"], "error: workers must be an integer >= 1 or None (one per GPU, else one per CPU), got 0"),
    (["--chunk-size", "0"], "error: chunk_size must be an integer >= 1, got 0"),
])
def test_ray_worker_and_chunk_counts_below_one_are_refused(photo_file, capsys, no_weights, tmp_path, flags, message):
    """Both ran before: 0 workers meant the default count, a chunk of 0 meant 1."""
    assert main(["batch", str(photo_file.parent), str(tmp_path / "out"), "--ray", *flags]) == 2
    assert one_error(capsys) == message
    assert not (tmp_path / "out").exists()


# -- model flags ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--preset", "tiny", "--original-config", "x.yaml"], "error: --original-config has no effect with --preset: "),
    (["--text-encoder-config", "x.json"], "error: --text-encoder-config has no effect with --preset: "),
    (["--checkpoint", "x.pth", "--preset-seed", "3"], "error: --preset-seed has no effect with --checkpoint: "),
])
def test_model_flags_another_source_would_ignore_are_refused(photo_file, capsys, no_weights, flags, message):
    assert main(["generate", str(photo_file), *flags]) == 2
    assert one_error(capsys) == message + ("--original-config and --text-encoder-config go with --checkpoint, "
                                           "--preset-seed with a random --preset")


def test_a_presets_tokenizer_flag_is_read_not_ignored(photo_file, tmp_path, capsys):
    """--tokenizer with a preset was dropped: an empty folder ran with the bundled vocabulary, exit code 0."""
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(photo_file), "--preset", "tiny", "--tokenizer", str(tmp_path / "empty"),
                 "-o", str(tmp_path / "out")]) == 2
    assert one_error(capsys) == (f"error: tokenizer folder {tmp_path / 'empty'} must hold vocab.json and merges.txt "
                                 "(or tokenizer.json)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--lora", "{missing}.safetensors"], "error: LoRA file {missing}.safetensors not found; --lora takes "
                                          "PATH[:STRENGTH], a .safetensors file and a strength in -4..4"),
    (["--lora", "{missing}.safetensors:strong"], "error: LoRA file {missing}.safetensors:strong not found; --lora "
                                                 "takes PATH[:STRENGTH], a .safetensors file and a strength in -4..4"),
    (["--controlnet", "{missing}"], "error: ControlNet not found: {missing}; --controlnet takes a diffusers ControlNet "
                                    "folder or a ControlNet checkpoint file"),
])
def test_missing_lora_and_controlnet_files_fail_before_the_base_weights_load(photo_file, capsys, no_weights, tmp_path,
                                                                             flags, message):
    missing = tmp_path / "missing"
    assert main(["generate", str(photo_file), "--preset", "tiny", *[f.format(missing=missing) for f in flags]]) == 2
    assert one_error(capsys) == message.format(missing=missing)


def test_a_checkpoint_path_that_is_a_folder_says_so(photo_file, capsys, tmp_path):
    assert main(["generate", str(photo_file), "--checkpoint", str(tmp_path)]) == 2
    assert one_error(capsys) == f"error: checkpoint file {tmp_path} is a folder; give the .pth/.ckpt/.safetensors file itself"


def test_generate_applies_the_size_guard_before_the_weights_load(photo_file, capsys, no_weights):
    assert main(["generate", str(photo_file), "--image-resolution", "100000"]) == 2
    err = one_error(capsys)
    h, w = cv2.imread(str(photo_file)).shape[:2]
    assert err.startswith(f"error: {photo_file}: image {h}x{w} resizes to ") and err.endswith(
        ": its long side exceeds max_side=2048; crop it, lower image_resolution, or raise max_side")


def test_a_corrupt_fid_weights_file_is_named_with_what_it_looks_like(tmp_path, capsys, photo_file):
    """It printed torch's pages about weights_only=True."""
    bad = tmp_path / "inception.pth"
    bad.write_text("not weights")
    assert main(["score", str(photo_file.parent), "-o", str(tmp_path / "out"), "--fid-weights", str(bad)]) == 2
    assert one_error(capsys) == (f"error: cannot read FID weights {bad} (looks like a text file); expected "
                                 "pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--controlnet-strengths", "1", "0.5"], "error: 2 --controlnet-strengths for 1 ControlNet; give one per ControlNet"),
    (["--control-image", "{photo}"], "error: 1 --control-image for 0 further ControlNets: the first ControlNet takes "
                                     "each photo's edges, and each one after it (--controlnet) one --control-image"),
])
def test_controlnet_counts_are_checked_before_the_weights_load(photo_file, capsys, no_weights, flags, message):
    assert main(["generate", str(photo_file), *[f.format(photo=photo_file) for f in flags]]) == 2
    assert one_error(capsys) == message


@pytest.mark.parametrize("device", ["cudafoo", "cuda:-1", "cuda:", "gpu"])
def test_a_misspelt_device_is_refused_by_name(device, capsys, photo_file, no_weights):
    """'cudafoo' and 'cuda:-1' passed as CUDA devices (the error then said no GPU, or torch raised on a GPU)."""
    assert main(["generate", str(photo_file), "--device", device]) == 2
    assert one_error(capsys) == f"error: unknown device {device!r}; use 'cpu' or 'cuda[:N]'"


def test_batch_clears_its_own_stale_writes_only(tiny_pipe, photo_file, tmp_path):
    """The output folder may hold the user's files: only atomic_path's temporaries beside output PNGs go
    (a folder named like `.cache.tmp` made the clean-up fail with IsADirectoryError)."""
    from sdcn_trt import GenerationConfig
    from sdcn_trt.batch.local import BatchSettings, run_batch

    out = tmp_path / "out"
    (out / ".cache.tmp").mkdir(parents=True)
    (out / ".notes.tmp").write_text("mine")
    (out / ".cat.png.k2j4_x9a.tmp").write_bytes(b"half a png")  # what a killed run leaves
    summary = run_batch(tiny_pipe, BatchSettings(str(photo_file.parent), str(out),
                                                 generation=GenerationConfig(image_resolution=64, ddim_steps=1)))
    assert summary.done == 1
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == [".cache.tmp", ".notes.tmp"]
    assert (out / ".notes.tmp").read_text() == "mine"


@pytest.mark.parametrize("backend", ["tensorrt", "inductor"])
def test_build_refuses_a_cache_dir_that_is_a_file_before_any_work(tmp_path, capsys, no_weights, backend):
    blocker = tmp_path / "engines"
    blocker.write_text("")
    assert main(["build", "--backend", backend, "--device", "cpu", "--cache-dir", str(blocker)]) == 2
    assert one_error(capsys) == f"error: --cache-dir {blocker} is not a folder; give a folder (created if missing)"


def test_an_export_size_off_the_vae_grid_names_a_size_that_fits(tmp_path, capsys):
    assert main(["export", "--networks", "vae_decoder", "--height", "100", "--width", "64",
                 "--cache-dir", str(tmp_path)]) == 2
    assert one_error(capsys) == ("error: image size 100x64 (height x width) is not a multiple of the VAE's 8 on both "
                                 "sides; e.g. 96x64")


def test_an_unreachable_ray_address_is_one_error_not_minutes_of_retries(photo_file, capsys, no_weights, tmp_path):
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["batch", str(photo_file.parent), str(tmp_path / "out"), "--ray-address", f"127.0.0.1:{port}"]) == 2
    assert one_error(capsys) == (f"error: no Ray cluster answers at 127.0.0.1:{port} (Connection refused); start one "
                                 "there (ray start --head) or leave out --ray-address for a local cluster")


# -- settings that turned into NaN images --------------------------------------------------------------
def test_an_eta_ddim_has_no_room_for_is_refused_with_the_largest_that_works():
    """eta > ~1 made sqrt(1 - a_prev - sigma^2) the root of a negative number: NaN latents, a black image, exit 0."""
    from sdcn_trt.pipeline.scheduler import make_ddim_schedule

    with pytest.raises(InputError) as raised:
        make_ddim_schedule(20, 1.5)
    assert str(raised.value) == ("eta=1.5 is too large for 20 DDIM steps: the noise it adds exceeds what the step's "
                                 "direction term leaves room for (sqrt(1 - a_prev - sigma^2) of a negative number: NaN "
                                 "images); use eta in 0..1.016 (1.0 is DDPM-like, 0 the default)")
    for eta in (0.0, 1.0, 1.016):  # the named largest works, and so does 1.0 at any step count
        assert all(np.isfinite(s.dir_coef) for s in make_ddim_schedule(20, eta).steps)
    assert all(np.isfinite(s.dir_coef) for steps in (1, 2, 50, 100) for s in make_ddim_schedule(steps, 1.0).steps)


def test_generate_with_a_too_large_eta_writes_nothing(photo_file, tmp_path, capsys):
    assert main(["generate", str(photo_file), "-o", str(tmp_path / "out"), "--eta", "50", "--ddim-steps", "2",
                 "--image-resolution", "64", "-q"]) == 2
    assert one_error(capsys).startswith("error: eta=50.0 is too large for 2 DDIM steps: ")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
