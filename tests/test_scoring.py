"""Scoring: PD plumbing, pixel metrics, the contest formula at its boundaries, the report."""
import json

import cv2
import numpy as np
import pytest

from sdcn_trt import BackendConfig, GenerationConfig, InputError, WeightsError
from sdcn_trt.scoring import contest_score, image_metrics, pd_factor, t_factor
from sdcn_trt.scoring.latency import measure, summarize
from sdcn_trt.scoring.pd import FID_WEIGHTS_FILE, PDScorer, find_fid_weights
from sdcn_trt.scoring.run import ScoreSettings, run_score


@pytest.fixture(scope="module")
def scorer():
    return PDScorer(random_seed=0)


# Expected values worked out by hand from the published formula (DESIGN.md, "The score"), not from
# the implementation: t_factor = 20000 - 28.8462 t (t < 520), 5000 - 2.40385 (t - 520) (t < 2600), else 0.
@pytest.mark.parametrize("t,expected", [
    (0, 20000.0), (100, 17115.38), (260, 12499.988), (519.999, 5000.0048462), (520, 5000.0), (1000, 3846.152),
    (1560, 2499.996), (2600, 0.0), (9000, 0.0),
])
def test_t_factor_pieces(t, expected):
    assert t_factor(t) == pytest.approx(expected, abs=1e-6)


def test_t_factor_pieces_meet():
    """The published pieces join at 520 ms (5000) and reach 0 at 2600 ms, to their rounded slopes."""
    assert t_factor(520 - 1e-9) == pytest.approx(t_factor(520), abs=0.05)
    assert t_factor(2600 - 1e-9) == pytest.approx(0.0, abs=0.05)


# pd_factor = 1 - 0.1 p (p < 4), 0.6 - 0.0125 (p - 4) (p < 8), 0.55 - 0.1375 (p - 8) (p <= 12), else 0
@pytest.mark.parametrize("p,expected", [
    (0, 1.0), (2, 0.8), (3.999, 0.6001), (4, 0.6), (6, 0.575), (7.999, 0.5500125), (8, 0.55), (10, 0.275),
    (12, 0.0), (12.001, 0.0), (float("nan"), 0.0),
])
def test_pd_factor_pieces(p, expected):
    assert pd_factor(p) == pytest.approx(expected, abs=1e-12)


def test_contest_score_examples():
    assert contest_score(3.24, 340) == pytest.approx(6889.989392)  # 0.676 x 10192.292 (the 340 ms team)
    assert contest_score(8.0, 186) == pytest.approx(8049.03374)  # 0.55 x 14634.6068 (the 186 ms winner)
    assert contest_score(4.0, 520) == pytest.approx(3000.0)  # 0.6 x 5000
    assert contest_score(0.0, 0.0) == pytest.approx(20000.0)
    assert contest_score(13, 100) == 0.0


def test_metrics_identical_and_different():
    a = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    same = image_metrics(a, a.copy())
    assert same == {"ssim": 1.0, "psnr": float("inf"), "mean_abs_diff": 0.0, "max_abs_diff": 0}
    b = a.copy()
    b[0, 0, 0] ^= 1
    m = image_metrics(a, b)
    assert m["max_abs_diff"] == 1 and 0.99 < m["ssim"] < 1 and m["psnr"] > 60
    with pytest.raises(InputError, match=r"images differ in size: reference \(32, 48, 3\) vs image \(48, 32, 3\)"):
        image_metrics(a, a.transpose(1, 0, 2).copy())


def test_pd_identical_files_is_zero(scorer, tmp_path, photo):
    cv2.imwrite(str(tmp_path / "a.png"), photo)
    cv2.imwrite(str(tmp_path / "b.png"), photo)
    cv2.imwrite(str(tmp_path / "c.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 50])
    assert scorer.features(tmp_path / "a.png").shape == (2048,)
    assert scorer.pd(tmp_path / "a.png", tmp_path / "b.png") == 0.0
    assert scorer.pd(tmp_path / "a.png", tmp_path / "c.jpg") > 0.0  # the codec is part of the metric
    (tmp_path / "bad.png").write_text("x")
    with pytest.raises(InputError, match="cannot read image"):
        scorer.pd(tmp_path / "a.png", tmp_path / "bad.png")


def test_missing_fid_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SDCN_FID_WEIGHTS", raising=False)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=f"FID Inception weights not found .*{FID_WEIGHTS_FILE}.*--fid-weights"):
        find_fid_weights(tmp_path / "nope.pth")
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("SDCN_FID_WEIGHTS", str(tmp_path / "w.pth"))
    assert find_fid_weights() == tmp_path / "w.pth"
    with pytest.raises(WeightsError, match="cannot read FID weights"):
        PDScorer()


def test_real_weights_file_path_loads(tmp_path):
    import torch

    from sdcn_trt.scoring.pd import random_inception_state

    torch.save(random_inception_state(3), tmp_path / FID_WEIGHTS_FILE)
    assert PDScorer(tmp_path / FID_WEIGHTS_FILE).weights == str(tmp_path / FID_WEIGHTS_FILE)


def test_latency_stats():
    s = summarize([10.0, 20.0, 30.0, 40.0])
    assert s == {"n": 4, "mean": 25.0, "p50": 25.0, "p90": 37.0, "min": 10.0, "max": 40.0}
    assert summarize([]) == {"n": 0}
    calls = []
    assert measure(lambda: calls.append(1), repeats=3, warmup=2)["n"] == 3 and len(calls) == 5


def test_score_settings():
    assert ScoreSettings(schedules=("full", "steps = 10", "eps=10")).schedules == ("full", "steps=10", "eps=10")
    for bad, message in (("eps", "unknown schedule term 'eps'"), ("eps=0", "integer >= 1"), ("fast=2", "unknown")):
        with pytest.raises(InputError, match=message):
            ScoreSettings(schedules=(bad,))
    with pytest.raises(InputError, match="image_format must be jpg or png"):
        ScoreSettings(image_format="bmp")


def test_score_onnxruntime_against_torch(tiny, tmp_path, photo):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "cat.png"), photo)
    cv2.imwrite(str(inputs / "cat_flipped.png"), photo[:, ::-1])
    (inputs / "broken.png").write_text("not an image")
    settings = ScoreSettings(inputs=str(inputs), output=str(tmp_path / "out"), schedules=("full", "eps=2"),
                             image_format="png", random_fid=True, warmup=0,
                             generation=GenerationConfig(image_resolution=64, ddim_steps=4))
    summary = run_score(tiny, BackendConfig(backend="onnxruntime"), settings)
    full = summary["schedules"]["full"]
    assert full["images"] == 2 and full["errors"] == 1
    rows = json.loads((tmp_path / "out" / "rows.json").read_text())
    scored = [r for r in rows if r["schedule"] == "full" and "error" not in r]
    # the parity tests' promise: onnxruntime within 1 level of torch on average; PNG keeps it exact
    assert all(r["mean_abs_diff"] <= 1.0 and r["max_abs_diff"] <= 2 and r["ssim"] > 0.99 for r in scored)
    eps = [r for r in rows if r["schedule"] == "eps=2" and "error" not in r]
    assert all(r["mean_abs_diff"] > 1.0 for r in eps)  # half the evaluations: a different image
    assert [r["error"] for r in rows if "error" in r][0].startswith("cannot decode image file")
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') >= 4 * 5 + 3 and "Not scored" in page
    assert "Random Inception weights" in page
    csv_lines = (tmp_path / "out" / "rows.csv").read_text().splitlines()
    assert csv_lines[0].startswith("image,schedule,latency_ms,pd") and len(csv_lines) == 1 + 6


def test_score_with_reference_dir_and_empty_folder(tiny, tmp_path, photo):
    inputs, refs = tmp_path / "in", tmp_path / "refs"
    inputs.mkdir(), refs.mkdir()
    with pytest.raises(InputError, match="no images found in"):
        run_score(tiny, BackendConfig(), ScoreSettings(inputs=str(inputs), output=str(tmp_path / "o"), random_fid=True))
    cv2.imwrite(str(inputs / "cat.png"), photo)
    cv2.imwrite(str(inputs / "dog.png"), photo)
    cv2.imwrite(str(refs / "cat.jpg"), np.zeros((64, 128, 3), np.uint8))
    summary = run_score(tiny, BackendConfig(), ScoreSettings(
        inputs=str(inputs), output=str(tmp_path / "o"), reference_dir=str(refs), random_fid=True, warmup=0,
        generation=GenerationConfig(image_resolution=64, ddim_steps=1)))
    rows = json.loads((tmp_path / "o" / "rows.json").read_text())
    assert summary["schedules"]["full"]["images"] == 1
    assert any("missing reference image for dog.png" in r.get("error", "") for r in rows)


def test_score_cli(tmp_path, photo, capsys):
    from sdcn_trt.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "cat.png"), photo)
    rc = main(["score", str(inputs), "-o", str(tmp_path / "o"), "--random-fid", "--ddim-steps", "1",
               "--image-resolution", "64", "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "mean PD" in out and "report:" in out


def test_report_page_shows_every_part_and_escapes_text(tmp_path, photo):
    from dataclasses import asdict

    from sdcn_trt.scoring.report import render_html

    for name in ("in.png", "ref.png", "acc.png"):
        cv2.imwrite(str(tmp_path / name), photo)
    canny = np.zeros(photo.shape, np.uint8)
    rows = [{"image": "<b>cat</b>.png", "schedule": "full", "latency_ms": 123.456, "pd": 12.5, "passed": False,
             "ssim": 0.98765, "max_abs_diff": 7, "input_path": str(tmp_path / "in.png"), "reference_path": "ref.png",
             "path": "acc.png", "canny": canny},
            {"image": "bad.png", "schedule": "full", "error": "cannot decode <x>"}]
    summary = {"backend": asdict(BackendConfig()), "fid_weights": "random (seed 0)", "schedules": {"full": {
        "images": 1, "errors": 1, "latency_ms": {"n": 1, "mean": 123.456, "p50": 123.456, "p90": 123.456,
                                                 "min": 123.456, "max": 123.456},
        "mean_pd": 12.5, "max_pd": float("inf"), "pd_failures": 1, "mean_ssim": 0.98765, "score": 0.0}}}
    page = render_html(tmp_path, rows, summary)
    assert "&lt;b&gt;cat&lt;/b&gt;.png" in page and "<b>cat</b>" not in page
    assert "cannot decode &lt;x&gt;" in page and "Not scored" in page and "Random Inception weights" in page
    assert "<td>full</td><td>1</td><td>1</td>" + "<td>123.456</td>" * 4 + "<td>12.500</td><td>inf</td><td>1</td>" in page
    assert "backend <b>torch</b> (fp32, cpu, CUDA graph off)" in page
    assert page.count('<img src="data:image/png;base64,') == 5 + 3  # five thumbnails, three plots
    assert '<td class="l fail">full<br>123.5 ms<br>PD 12.500<br>SSIM 0.9877<br>max |diff| 7</td>' in page
    summary["fid_weights"] = "/weights/pt_inception.pth"
    assert "Random Inception weights" not in render_html(tmp_path, rows[1:], summary)
