"""`sdcn-trt` sub-commands, run in-process through main() and once as a real console script."""
import json
import subprocess
import sys

import cv2
import pytest

from sdcn_trt.cli import build_parser, main


@pytest.fixture
def photo_file(tmp_path, photo):
    path = tmp_path / "in" / "cat.jpg"
    path.parent.mkdir()
    cv2.imwrite(str(path), photo[:, :, ::-1])
    return path


def test_generate_writes_images_and_canny(tmp_path, photo_file, capsys):
    out = tmp_path / "out"
    rc = main(["generate", str(photo_file.parent), "-o", str(out), "--image-resolution", "64", "--ddim-steps", "2",
               "--num-samples", "2", "--save-control", "--quiet", "--seed", "5"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat_0.png", "cat_1.png", "cat_canny.png"]
    assert cv2.imread(str(out / "cat_0.png")).shape == (64, 128, 3)
    assert "seed 5" in capsys.readouterr().out


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
        if f.name != "eps_steps":  # the API's old spelling of --schedule eps=N has no flag
            assert getattr(args, f.name) == f.default
    args = build_parser().parse_args(["generate", "x.png", "--schedule", "eps=10", "--max-side", "1024"])
    assert (args.schedule, args.max_side) == ("eps=10", 1024)


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


def test_build_without_tensorrt_says_what_is_missing(capsys):
    rc = main(["build", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and ("TensorRT is not installed" in err or "only TensorRT's type stubs are installed" in err
                        or "no CUDA GPU" in err)
    assert "sdcn_trt[tensorrt]" in err or "no CUDA GPU" in err


def test_generate_tensorrt_backend_is_a_clear_error(photo_file, capsys):
    assert main(["generate", str(photo_file), "--backend", "tensorrt", "--device", "cuda"]) == 2
    assert "backend 'tensorrt' is unavailable" in capsys.readouterr().err
