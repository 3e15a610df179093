"""Schedules as data: spellings, the kind of every step, validation, files."""
import json

import pytest

from sdcn_trt import GenerationConfig, InputError
from sdcn_trt.schedule import kinds_spelling, load_schedule_file, num_ddim_steps, parse_schedule

F, E, C, S = "full", "reuse_eps", "reuse_control", "shallow"


def test_step_counts_follow_ldm():
    assert [num_ddim_steps(n) for n in (20, 10, 7, 6, 1)] == [20, 10, 8, 7, 1]  # 1000 // 7 = 142 -> 8 timesteps


@pytest.mark.parametrize("text,steps,kinds", [
    ("full", 20, (F,) * 20),
    ("steps=10", 10, (F,) * 10),
    ("eps=10", 20, (F, E) * 10),
    ("eps=2", 5, (F, E, F, E, E)),  # 2 of 5: positions 0 and int(2.5) = 2
    ("control=3", 5, (F, F, C, F, C)),  # positions 0, int(5/3) = 1, int(10/3) = 3
    ("deepcache=3", 7, (F, S, S, F, S, S, F, S)),  # ddim_steps=7 runs 8 steps
    ("steps=4+eps=2", 20, (F, E, F, E)),
    ("kinds=fecs", 4, (F, E, C, S)),
])
def test_kinds_per_step(text, steps, kinds):
    schedule = parse_schedule(text)
    run = schedule.steps_for(steps)
    assert schedule.resolve(steps) == kinds and num_ddim_steps(run) == len(kinds)


def test_contest_winner_list_counts_from_the_end():
    """xiatwhu/trt2023 evaluated at ldm indices 19,18,17,16,15,14,13,11,8,4 of 20 (19 = the first step)."""
    kinds = parse_schedule("full@19,18,17,16,15,14,13,11,8,4").resolve(20)
    full_positions = [i for i, k in enumerate(kinds) if k == F]
    assert full_positions == [0, 1, 2, 3, 4, 5, 6, 8, 11, 15]  # position = 19 - index
    assert parse_schedule("full@4, 8,19").spec == "full@19,8,4"


@pytest.mark.parametrize("text,message", [
    ("fast", "unknown schedule term 'fast'"),
    ("eps=x", "expected an integer >= 1, got 'x'"),
    ("eps=0", "expected an integer >= 1, got '0'"),
    ("eps=3+control=2", "two step rules"),
    ("steps=4+steps=5", "steps= twice"),
    ("kinds=fxz", r"unknown step letters \['x', 'z'\]"),
    ("", "non-empty string"),
])
def test_bad_spellings(text, message):
    with pytest.raises(InputError, match=message):
        parse_schedule(text)


@pytest.mark.parametrize("text,message", [
    ("eps=21", r"eps=N needs N in 1..20 \(the run has 20 steps\), got 21"),
    ("full@20,3", r"step indices \[20\] are out of range 0..19"),
    ("full@10,3", "the first step must be full"),
    ("kinds=ffe", "names 3 steps; the run has 20"),
    ("kinds=" + "e" * 20, "the first step must be full"),
])
def test_schedules_that_do_not_fit_the_run(text, message):
    with pytest.raises(InputError, match=message):
        parse_schedule(text).resolve(20)
    with pytest.raises(InputError, match=message):
        GenerationConfig(schedule=text)  # refused when the config is made, not mid-run


def test_config_folds_eps_steps_into_the_schedule():
    config = GenerationConfig(eps_steps=10)
    assert (config.schedule, config.eps_steps) == ("eps=10", 0)
    assert config.replace(schedule="full").step_kinds() == (20, (F,) * 20)
    with pytest.raises(InputError, match="give either eps_steps=5 or schedule='control=3', not both"):
        GenerationConfig(eps_steps=5, schedule="control=3")
    assert GenerationConfig(schedule=" steps=10 + eps=5 ").schedule == "steps=10+eps=5"


def test_schedule_files(tmp_path):
    good = tmp_path / "best.json"
    good.write_text(json.dumps({"schedule": "eps=10", "measured": {"ms": 1.0}}))
    assert load_schedule_file(good) == "eps=10"
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps({"ddim_steps": 4, "kinds": [F, E, C, F]}))
    assert load_schedule_file(explicit) == "steps=4+kinds=fecf"
    assert kinds_spelling([F, S]) == "kinds=fs"
    with pytest.raises(InputError, match=r"unknown step kinds \['half'\]"):
        kinds_spelling([F, "half"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_schedule_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold"):
        load_schedule_file(bad)
    with pytest.raises(InputError, match="cannot read schedule file"):
        load_schedule_file(tmp_path / "missing.json")


def test_step_counts_past_the_table_are_refused_when_the_config_is_made():
    with pytest.raises(InputError, match="ddim_steps=3 is not usable .* its last timestep would be 1000"):
        GenerationConfig(ddim_steps=3)
    with pytest.raises(InputError, match="ddim_steps=3 is not usable"):
        GenerationConfig(schedule="steps=3")
