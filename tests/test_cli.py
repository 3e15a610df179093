"""`sdcn-trt` sub-commands, run in-process through main() and once as a real console script."""
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from sdcn_trt import backend_available
from sdcn_trt.cli import build_parser, main
from sdcn_trt.cli_options import generation_config


def test_generate_writes_images_and_canny(tmp_path, photo_file, capsys):
    out = tmp_path / "out"
    rc = main(["generate", str(photo_file.parent), "-o", str(out), "--image-resolution", "64", "--ddim-steps", "2",
               "--num-samples", "2", "--save-control", "--quiet", "--seed", "5"])
    assert rc == 0
    # named as `batch` names them: <input>.png, <input>_1.png for the second sample, <input>_canny.png
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "cat_1.png", "cat_canny.png"]
    assert cv2.imread(str(out / "cat.png")).shape == (64, 128, 3)
    assert f"{photo_file} -> {out / 'cat.png'}, {out / 'cat_1.png'}, {out / 'cat_canny.png'} (seed 5, " in (
        capsys.readouterr().out)


def test_generate_and_batch_write_the_same_files(tiny_pipe, tmp_path, photo_file, capsys):
    from sdcn_trt import GenerationConfig
    from sdcn_trt.batch.local import BatchSettings, run_batch

    (photo_file.parent / "sub").mkdir()
    cv2.imwrite(str(photo_file.parent / "sub" / "dog.png"), cv2.imread(str(photo_file))[:, ::-1])
    flags = ["--image-resolution", "64", "--ddim-steps", "1", "--save-control", "--quiet"]
    assert main(["generate", str(photo_file.parent), "-o", str(tmp_path / "gen"), *flags]) == 0
    config = GenerationConfig(image_resolution=64, ddim_steps=1)
    run_batch(tiny_pipe, BatchSettings(str(photo_file.parent), str(tmp_path / "batch"), save_control=True,
                                       generation=config))
    generated = sorted(str(p.relative_to(tmp_path / "gen")) for p in (tmp_path / "gen").rglob("*.png"))
    assert generated == ["cat.png", "cat_canny.png", "sub/dog.png", "sub/dog_canny.png"]
    for name in generated:
        assert (tmp_path / "gen" / name).read_bytes() == (tmp_path / "batch" / name).read_bytes()


SMALL = ["--image-resolution", "64", "--ddim-steps", "4"]  # (ldm's DDIM reference cannot run 3)


def _record_samplers(monkeypatch) -> list[str]:
    """The sampler of every image the pipeline runs, in order."""
    from sdcn_trt import ControlNetPipeline

    seen, real = [], ControlNetPipeline.run

    def run(self, image, config, *args, **kwargs):
        seen.append(config.sampler)
        return real(self, image, config, *args, **kwargs)

    monkeypatch.setattr(ControlNetPipeline, "run", run)
    return seen


def test_score_runs_the_sampler_it_is_given(tmp_path, photo_file, monkeypatch, capsys):
    """The scored runs (warm-up and timed) use --sampler; the reference stays ldm's DDIM (process())."""
    seen = _record_samplers(monkeypatch)
    out = tmp_path / "score"
    assert main(["score", str(photo_file.parent), "-o", str(out), "--random-fid", *SMALL, "--sampler", "unipc"]) == 0
    assert seen == ["ddim", "unipc", "unipc"]
    assert (out / "full" / "cat.jpg").is_file() and "report:" in capsys.readouterr().out


def test_batch_runs_the_sampler_it_is_given(tiny_pipe, tmp_path, photo_file, monkeypatch):
    from sdcn_trt import GenerationConfig

    seen = _record_samplers(monkeypatch)
    out = tmp_path / "batch"
    assert main(["batch", str(photo_file.parent), str(out), *SMALL, "--sampler", "unipc"]) == 0
    assert seen == ["unipc"]
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["settings"]["sampler"] == "unipc"
    config = GenerationConfig(image_resolution=64, ddim_steps=4, sampler="unipc")
    expected = tiny_pipe.run(cv2.imread(str(photo_file)), config).images[0]  # as tests/test_batch.py reads it
    assert np.array_equal(cv2.imread(str(out / "cat.png"))[:, :, ::-1], expected)


def test_generate_refuses_inputs_that_would_overwrite_each_other(tmp_path, photo_file, capsys):
    other = tmp_path / "other" / "cat.png"
    other.parent.mkdir()
    cv2.imwrite(str(other), cv2.imread(str(photo_file)))
    assert main(["generate", str(photo_file), str(other), "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"error: inputs would overwrite each other's outputs: {photo_file}, {other} "
                                       "-> cat.png; rename them or run them apart\n")
    assert not (tmp_path / "o").exists()


def test_generate_bad_file_is_one_clear_error(tmp_path, photo_file, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    rc = main(["generate", str(photo_file), str(bad), "-o", str(tmp_path / "o"), "--ddim-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot decode image file") and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # validated before any work


def test_generate_bad_settings(tmp_path, photo_file, capsys):
    assert main(["generate", str(photo_file), "--ddim-steps", "0"]) == 2
    assert "ddim_steps must be >= 1" in capsys.readouterr().err
    assert main(["generate", str(photo_file), "--preset", "tiny", "--checkpoint", "x.pth"]) == 2
    assert "choose one model source" in capsys.readouterr().err
    assert main(["generate", str(photo_file), "--sd-dir", str(tmp_path)]) == 2
    assert "--sd-dir needs --controlnet" in capsys.readouterr().err


def test_flags_equal_config_fields():
    from dataclasses import fields

    from sdcn_trt import GenerationConfig

    args = build_parser().parse_args(["generate", "x.png"])
    for f in fields(GenerationConfig):
        if f.name == "sampler":  # None: not given (a --schedule-file's sampler, else the default)
            assert args.sampler is None and generation_config(args).sampler == f.default
        elif f.name != "eps_steps":  # the API's old spelling of --schedule eps=N has no flag
            assert getattr(args, f.name) == f.default
    args = build_parser().parse_args(["generate", "x.png", "--schedule", "eps=10", "--max-side", "1024"])
    assert (args.schedule, args.max_side) == ("eps=10", 1024)


def test_backend_flags_equal_backend_config_fields():
    from dataclasses import fields

    from sdcn_trt import BackendConfig
    from sdcn_trt.cli import backend_config

    args = build_parser().parse_args(["generate", "x.png"])
    assert backend_config(args) == BackendConfig()
    for f in fields(BackendConfig):
        assert getattr(args, f.name) == f.default
    args = build_parser().parse_args(["generate", "x.png", "--backend", "inductor", "--compiled-networks", "fused_step",
                                      "vae_decoder"])
    assert backend_config(args) == BackendConfig(backend="inductor", compiled_networks=("fused_step", "vae_decoder"))


def test_preset_help_names_the_preset_each_command_loads(monkeypatch):
    from sdcn_trt import cli, cli_options

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    def preset_help(command: str) -> str:
        return next(a.help for a in commands[command]._actions if a.dest == "preset")

    loaded = []
    monkeypatch.setattr(cli_options, "load_preset", lambda name, **kw: loaded.append(name) or "components")
    monkeypatch.setattr(cli_options, "with_controlnets", lambda components, controlnets: components)
    for command in ("generate", "export", "build", "score", "tune", "batch"):
        args = build_parser().parse_args([command] + {"generate": ["x.png"], "batch": ["in", "out"]}.get(command, []))
        cli_options.load_base_components(args)
        assert preset_help(command).endswith(f"(default: {loaded[-1]})"), (command, loaded[-1])
    assert loaded == ["tiny"] * 6
    # the web page loads tiny-trained without a model flag (test_app.py checks cmd_app), and its help says so
    assert preset_help("app").endswith("(default: tiny-trained)") and cli.APP_PRESET == "tiny-trained"


@pytest.mark.parametrize("names,message", [
    (["fused_step", "clip"], "error: unknown network 'clip' in compiled_networks; valid names: text_encoder, "
                             "control_hint, controlnet, unet, fused_step, unet_deep, unet_shallow, vae_decoder, "
                             "vae_encoder\n"),
    ([], "error: compiled_networks is empty: name at least one network, or give None for all; valid names: "
         "text_encoder, "),
])
def test_bad_compiled_networks_are_one_clear_error(photo_file, capsys, names, message):
    rc = main(["generate", str(photo_file), "--backend", "inductor", "--compiled-networks", *names])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(message) and "Traceback" not in err


def test_export_command(tmp_path, capsys):
    rc = main(["export", "--networks", "vae_decoder", "--height", "64", "--width", "64", "-o", str(tmp_path / "onnx"),
               "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "onnx" / "vae_decoder.onnx").is_file()
    assert "images: onnxruntime vs torch fp32 max |diff|" in out
    assert main(["export", "--networks", "nope", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "valid networks: text_encoder" in capsys.readouterr().err


def test_demo_runs_as_a_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdcn_trt.cli", "demo", "-o", str(tmp_path), "--ddim-steps", "1",
                           "--samples", "camera", "--backends", "torch", "onnxruntime"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "camera_torch.png").is_file() and (tmp_path / "demo_sheet.png").is_file()
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["backends"]["onnxruntime"]["mean_abs_diff"] <= 1.0
    assert "vs torch fp32: max |diff|" in proc.stdout
    # after the run: PD (random Inception weights here, said so), contest score, the files written
    assert "random Inception weights" in proc.stdout and summary["pd_weights"] == "random"
    assert re.search(r"\[onnxruntime\] PD vs torch fp32: mean \d+\.\d+, max \d+\.\d+; contest score", proc.stdout)
    assert proc.stdout.rstrip().endswith(f"wrote 2 images, {tmp_path / 'demo_sheet.png'} and "
                                         f"{tmp_path / 'demo_summary.json'}")
    # one bar over the run's two images (one photo, two backends); no bar per image
    assert re.search(r"demo onnxruntime: 100%.*\| 2/2 \[", proc.stderr), proc.stderr[-2000:]
    assert not re.search(r"\| 1/1 \[", proc.stderr), proc.stderr[-2000:]


TENSORRT_USABLE = backend_available("tensorrt")[0]
needs_no_tensorrt = pytest.mark.skipif(TENSORRT_USABLE, reason="TensorRT and a GPU are here: nothing is missing")


@needs_no_tensorrt
def test_build_without_tensorrt_says_what_is_missing(capsys):
    rc = main(["build", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and ("TensorRT is not installed" in err or "only TensorRT's type stubs are installed" in err
                        or "no CUDA GPU" in err)
    assert "sdcn_trt[tensorrt]" in err or "no CUDA GPU" in err


def test_build_settings_come_from_the_flags_by_name():
    from sdcn_trt import BackendConfig
    from sdcn_trt.cli import build_settings
    from sdcn_trt.engines.tensorrt.plan import BuildSettings
    from sdcn_trt.export.descriptors import ShapeRange, ShapeSpec

    args = build_parser().parse_args(["build", "--precision", "fp32", "--optimization-level", "5", "--workspace-gib",
                                      "2", "--batch", "2", "--height", "320", "--width", "448", "--dynamic",
                                      "--max-batch", "3", "--min-side", "128", "--max-side", "512",
                                      "--device", "cuda:1", "--cache-dir", "/engines"])
    before = vars(args).copy()
    settings, backend = build_settings(args)
    assert vars(args) == before  # nothing written into the parsed flags
    assert settings == BuildSettings(precision="fp32", optimization_level=5, workspace_gib=2.0, shape_range=ShapeRange(
        min=ShapeSpec(1, 128, 128), opt=ShapeSpec(2, 320, 448), max=ShapeSpec(3, 512, 512)))
    assert backend == BackendConfig(backend="tensorrt", device="cuda:1", precision="fp32", cache_dir="/engines")
    static, _ = build_settings(build_parser().parse_args(["build"]))
    assert static == BuildSettings(precision="fp16")  # the contest shape, static


def test_bad_build_flags_fail_before_tensorrt_is_asked_for(capsys):
    assert main(["build", "--optimization-level", "9"]) == 2
    assert capsys.readouterr().err == "error: optimization_level must be in 0..5, got 9\n"


@needs_no_tensorrt
def test_generate_tensorrt_backend_is_a_clear_error(photo_file, capsys):
    assert main(["generate", str(photo_file), "--backend", "tensorrt", "--device", "cuda"]) == 2
    assert "backend 'tensorrt' is unavailable" in capsys.readouterr().err


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_warnings_stay_out_of_the_terminal_unless_verbose(tmp_path, verbose):
    """A first export traces diffusers' VAE and transformers' CLIP: torch.onnx warns about both."""
    cmd = [sys.executable, "-m", "sdcn_trt.cli", *(["-v"] if verbose else []), "export", "--networks", "vae_decoder",
           "text_encoder", "--height", "64", "--width", "64", "--cache-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    if verbose:
        assert any(line.startswith("DEBUG py.warnings: ") and "TracerWarning" in line for line in lines)
    else:
        ours = [line.split(":")[0] for line in lines if not line.startswith("INFO sdcn_trt.models.weights_cache: wrote")]
        assert ours == ["INFO sdcn_trt.export.onnx_export"] * 2, proc.stderr  # (the preset's first draw is cached)


def test_build_warms_the_exports_and_torch_compile_caches_for_the_next_process(tmp_path, capsys):
    """build --backend onnxruntime exports every network the pipeline runs (a second build finds them cached);
    build --backend torch --compile compiles the named networks into the compile cache; eager torch caches nothing."""
    cache = tmp_path / "cache"
    common = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--height", "64", "--width", "64",
              "--cache-dir", str(cache)]
    assert main(["build", "--backend", "onnxruntime", *common]) == 0
    first = capsys.readouterr().out
    assert first.count("exported in") == 4 and "fused_step: ONNX " in first and "the next process starts" in first
    assert main(["build", "--backend", "onnxruntime", *common]) == 0
    assert capsys.readouterr().out.count("(cached)") == 4
    assert main(["build", "--backend", "torch", "--compile", "default", "--networks", "control_hint", *common]) == 0
    out = capsys.readouterr().out
    assert f"control_hint: torch.compile caches in {cache / 'torch_compile'}" in out
    assert "fused_step: nothing to cache (eager torch)" in out
    assert list((cache / "torch_compile").glob("*/mega-cache/control_hint-*.bin"))
    assert main(["build", "--backend", "torch", "--compile-flags", "conv_1x1_as_mm", *common]) == 2
    assert "compile_flags conv_1x1_as_mm are torch.compile's inductor settings" in capsys.readouterr().err
