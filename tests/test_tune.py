"""`sdcn-trt tune`: candidates measured against the reference, greedy search, resume, the schedule file."""
import json

import cv2
import pytest

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig, InputError
from sdcn_trt.cli import main
from sdcn_trt.scoring.tune import TuneSettings, Tuner, default_candidates, evaluations, pareto_frontier, tune


@pytest.fixture(scope="module")
def photos(tmp_path_factory, photo):
    folder = tmp_path_factory.mktemp("tune_in")
    cv2.imwrite(str(folder / "cat.png"), photo)
    cv2.imwrite(str(folder / "flip.png"), photo[:, ::-1].copy())
    return folder


def _settings(photos, out, **kw):
    generation = GenerationConfig(image_resolution=64, ddim_steps=4)
    return TuneSettings(inputs=str(photos), output=str(out), warmup=0, generation=generation, **kw)


def test_tune_measures_picks_and_resumes(tiny, photos, tmp_path, monkeypatch):
    runs = []
    real = ControlNetPipeline.run
    monkeypatch.setattr(ControlNetPipeline, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    settings = _settings(photos, tmp_path / "t", candidates=("full", "eps=2", "control=2", "deepcache=2"),
                         greedy_budget=3, min_ssim=0.999)  # only full is within the bound: greedy starts there
    summary = tune(tiny, BackendConfig(), settings, progress=False)
    assert summary["quality"] == "ssim" and summary["fid_weights"] is None
    by = {r["schedule"]: r for r in summary["candidates"]}
    assert by["full"]["max_abs_diff"] == 0 and by["full"]["ssim"] == 1.0  # torch fp32 full = the reference
    assert by["eps=2"]["evaluations"] == {"controlnet": 2, "unet": 2, "shallow": 0, "steps": 4}
    assert by["control=2"]["evaluations"] == {"controlnet": 2, "unet": 4, "shallow": 0, "steps": 4}
    assert by["deepcache=2"]["evaluations"] == {"controlnet": 2, "unet": 2, "shallow": 2, "steps": 4}
    assert len(summary["candidates"]) == 4 + 3  # the greedy search spent its budget of 3 (of 6 first-round options)
    greedy = summary["candidates"][4:]
    assert all(r["schedule"].startswith("steps=4+kinds=f") for r in greedy)
    best = json.loads((tmp_path / "t" / "best_schedule.json").read_text())
    assert best["schedule"] == summary["best"]["schedule"]
    assert summary["best"]["objective"] == max(r["objective"] for r in summary["candidates"])
    assert (tmp_path / "t" / "report.html").read_text().count("<tr") == 1 + 7
    # the schedule file drives generate
    config = GenerationConfig(image_resolution=64, ddim_steps=4, schedule=best["schedule"])
    assert config.schedule == best["schedule"]
    # a second run measures nothing again
    before = len(runs)
    again = tune(tiny, BackendConfig(), settings, progress=False)
    assert len(runs) == before  # references and candidates come from the caches
    assert [r["key"] for r in again["candidates"]] == [r["key"] for r in summary["candidates"]]


def test_greedy_stops_when_nothing_stays_within_the_bound(tiny, photos, tmp_path):
    settings = _settings(photos, tmp_path / "strict", candidates=("full",), greedy_budget=10, min_ssim=1.0)
    summary = tune(tiny, BackendConfig(), settings, progress=False)
    # one round: steps 1..3 each tried as reuse_eps and reuse_control, none identical to the reference
    assert len(summary["candidates"]) == 1 + 6
    assert summary["best"]["schedule"] == "full"


def test_pd_quality_with_fid_weights(tiny, photos, tmp_path):
    settings = _settings(photos, tmp_path / "pd", candidates=("full", "eps=2"), greedy=False, random_fid=True)
    summary = tune(tiny, BackendConfig(), settings, progress=False)
    assert summary["quality"] == "pd" and summary["fid_weights"].startswith("random")
    by = {r["schedule"]: r for r in summary["candidates"]}
    assert by["full"]["pd"] == 0.0 and by["eps=2"]["pd"] > 0


def test_frontier_and_candidates():
    def rec(name, ms, ssim):
        return {"key": name, "schedule": name, "latency_ms": {"mean": ms}, "ssim": ssim, "pd": 10 * (1 - ssim)}
    records = [rec("a", 100, 1.0), rec("b", 50, 0.95), rec("c", 60, 0.90), rec("d", 40, 0.80), rec("e", 45, 0.96)]
    assert [r["key"] for r in pareto_frontier(records, "ssim")] == ["d", "e", "a"]
    assert [r["key"] for r in pareto_frontier(records, "pd")] == ["d", "e", "a"]
    assert default_candidates(20) == ["full", "steps=10", "eps=5", "eps=7", "eps=10", "eps=14", "control=5",
                                      "control=7", "control=10", "control=14", "deepcache=2", "deepcache=3",
                                      "deepcache=5"]
    assert evaluations(("full", "reuse_eps", "shallow")) == {"controlnet": 1, "unet": 1, "shallow": 1, "steps": 3}


@pytest.mark.parametrize("kw,message", [
    (dict(candidates=("fast",)), "unknown schedule term 'fast'"),
    (dict(greedy_kinds=("full",)), r"greedy_kinds \['full'\] are not step kinds"),
    (dict(greedy_budget=-1), "must be >= 0"),
    (dict(min_ssim=1.5), r"min_ssim must be in \(0, 1\]"),
])
def test_bad_settings(kw, message):
    with pytest.raises(InputError, match=message):
        TuneSettings(**kw)


def test_missing_fid_weights_file_is_an_error(tiny, photos, tmp_path):
    from sdcn_trt import WeightsError

    with pytest.raises(WeightsError, match="FID Inception weights not found"):
        Tuner(tiny, BackendConfig(), _settings(photos, tmp_path / "x", fid_weights=str(tmp_path / "none.pth")))


def test_tune_command_writes_a_schedule_file_generate_accepts(photos, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["tune", str(photos), "-o", str(out), "--candidates", "full", "eps=2", "--no-greedy", "-q",
               "--image-resolution", "64", "--ddim-steps", "4", "--warmup", "0"])
    printed = capsys.readouterr().out
    assert rc == 0 and "best: " in printed and "report: " in printed
    rc = main(["generate", str(photos / "cat.png"), "-o", str(tmp_path / "gen"), "-q", "--image-resolution", "64",
               "--ddim-steps", "4", "--schedule-file", str(out / "best_schedule.json")])
    assert rc == 0 and list((tmp_path / "gen").glob("*.png"))


def test_tune_searches_samplers_and_the_schedule_file_carries_the_sampler(photos, tmp_path, capsys):
    """Sampler x schedule: every candidate with each sampler, against the one DDIM reference; the best's
    sampler goes into best_schedule.json and generate takes it from there (the same bytes as --sampler)."""
    out = tmp_path / "samplers"
    rc = main(["tune", str(photos), "-o", str(out), "--candidates", "full", "eps=2", "--samplers", "ddim", "unipc",
               "--no-greedy", "-q", "--image-resolution", "64", "--ddim-steps", "4", "--warmup", "0", "--min-ssim", "0.01"])
    printed = capsys.readouterr().out
    assert rc == 0
    summary = json.loads((out / "tune.json").read_text())
    pairs = [(r["sampler"], r["schedule"]) for r in summary["candidates"]]
    assert pairs == [("ddim", "full"), ("ddim", "eps=2"), ("unipc", "full"), ("unipc", "eps=2")]
    by = {pair: r for pair, r in zip(pairs, summary["candidates"], strict=True)}
    assert by[("ddim", "full")]["max_abs_diff"] == 0 and by[("unipc", "full")]["max_abs_diff"] > 0  # DDIM reference
    best = json.loads((out / "best_schedule.json").read_text())
    assert best["sampler"] == summary["best"]["sampler"]
    # the terminal shows the frontier (which pairs are on it depends on timings) and names the best's sampler
    assert f"best: {best['sampler']} {best['schedule']} (" in printed and "sampler" in (out / "report.html").read_text()
    best["sampler"], best["schedule"] = "unipc", "eps=2"
    (out / "pick.json").write_text(json.dumps(best))
    common = [str(photos / "cat.png"), "-q", "--image-resolution", "64", "--ddim-steps", "4"]
    assert main(["generate", *common, "-o", str(tmp_path / "a"), "--schedule-file", str(out / "pick.json")]) == 0
    assert main(["generate", *common, "-o", str(tmp_path / "b"), "--schedule", "eps=2", "--sampler", "unipc"]) == 0
    assert (tmp_path / "a" / "cat.png").read_bytes() == (tmp_path / "b" / "cat.png").read_bytes()
    assert main(["generate", *common, "-o", str(tmp_path / "c"), "--schedule-file", str(out / "pick.json"),
                 "--sampler", "euler"]) == 2
    assert "--sampler euler and the schedule file's sampler unipc disagree" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown sampler 'nope'"):
        TuneSettings(samplers=("nope",))
    with pytest.raises(InputError, match="sampler lcm cannot run 60 steps"):
        TuneSettings(samplers=("lcm",), generation=GenerationConfig(ddim_steps=60))
