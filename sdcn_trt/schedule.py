"""Schedules as data: which networks each DDIM step evaluates, parsed from short strings or JSON.

A step is one of four kinds:
- `full`: ControlNet + UNet (the reference does this at every step);
- `reuse_eps`: no network; the last guided noise prediction is reused (the contest winner's trick);
- `reuse_control`: the UNet only, with the ControlNet residuals of the last full step
  (encoder propagation, Faster Diffusion, Li et al. 2023);
- `shallow`: only the UNet's outer blocks, on the deep features cached at the last full step
  (DeepCache, Ma et al. 2023).

Spellings (terms joined by `+`; run order is the order of DDIM steps, first step first):
  full                 every step full (the reference)
  steps=N              N DDIM steps instead of the configured count (all full unless another term says)
  eps=N                N full steps spread evenly, `reuse_eps` at the others
  control=N            N full steps spread evenly, `reuse_control` at the others
  deepcache=N          a full step every N steps, `shallow` in between
  full@19,18,...,4     full at these step indices counted from the end (ldm's `index`: the first of
                       20 steps is 19), `reuse_eps` at the others
  kinds=fecs...        one letter per step in run order: f full, e reuse_eps, c reuse_control, s shallow
e.g. `steps=10+eps=5`. A JSON file holds {"schedule": "<spelling>"} or {"ddim_steps": N, "kinds": [...]}.
The first step is always full: nothing exists yet to reuse.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdcn_trt.errors import InputError

FULL, REUSE_EPS, REUSE_CONTROL, SHALLOW = "full", "reuse_eps", "reuse_control", "shallow"
KINDS = (FULL, REUSE_EPS, REUSE_CONTROL, SHALLOW)
LETTERS = {"f": FULL, "e": REUSE_EPS, "c": REUSE_CONTROL, "s": SHALLOW}
FAMILIES = {"eps": REUSE_EPS, "control": REUSE_CONTROL}  # N full steps spread evenly, this kind between
NUM_TRAIN_TIMESTEPS = 1000
SPELLINGS = "full, steps=N, eps=N, control=N, deepcache=N, full@i,j,..., kinds=fecs..., joined with '+'"


def num_ddim_steps(ddim_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """How many steps ldm's uniform DDIM runs for `ddim_steps`: len(range(0, T, T // steps)) (7 -> 8).
    Step counts whose last timestep would fall past the table (3 -> 1000) are refused, as the
    original sampler crashes on them."""
    if isinstance(ddim_steps, bool) or not isinstance(ddim_steps, int) or not 1 <= ddim_steps <= num_train_timesteps:
        raise InputError(f"ddim_steps must be an integer in 1..{num_train_timesteps}, got {ddim_steps!r}")
    stride = num_train_timesteps // ddim_steps
    count = len(range(0, num_train_timesteps, stride))
    if (count - 1) * stride + 1 >= num_train_timesteps:
        raise InputError(
            f"ddim_steps={ddim_steps} is not usable with ldm's uniform DDIM discretisation: its last timestep would "
            f"be {(count - 1) * stride + 1} (the table ends at {num_train_timesteps - 1}); choose another step count")
    return count


def num_steps(steps: int, sampler: str = "ddim") -> int:
    """How many steps a run of `steps` takes: ldm's DDIM may run more (num_ddim_steps); every other sampler
    runs exactly `steps`."""
    if sampler == "ddim":
        return num_ddim_steps(steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise InputError(f"steps must be an integer in 1..{NUM_TRAIN_TIMESTEPS}, got {steps!r}")
    return steps


def spread(total: int, count: int) -> set[int]:
    """`count` of `total` step positions spread evenly, the first included: 10 of 20 -> 0, 2, ..., 18."""
    return {int(j * total / count) for j in range(count)}


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: an optional step-count override and a rule that gives each step its kind."""

    spec: str  # the canonical spelling (what cache keys and reports record)
    ddim_steps: int | None = None  # `steps=N`
    family: str = FULL  # full | eps | control | deepcache | at | kinds
    n: int = 0  # N of eps / control / deepcache
    indices: tuple[int, ...] = ()  # `full@...`, counted from the end
    kinds: tuple[str, ...] = ()  # `kinds=...`, run order

    def steps_for(self, configured: int) -> int:
        """The DDIM step count this schedule runs when the configuration asks for `configured`."""
        return self.ddim_steps or configured

    def resolve(self, configured: int, sampler: str = "ddim") -> tuple[str, ...]:
        """The kind of every step, in run order, for a configuration asking `configured` steps of `sampler`."""
        total = num_steps(self.steps_for(configured), sampler)
        if self.family == FULL:
            kinds = (FULL,) * total
        elif self.family in FAMILIES:
            if not 1 <= self.n <= total:
                raise InputError(f"schedule {self.spec!r}: {self.family}=N needs N in 1..{total} "
                                 f"(the run has {total} steps), got {self.n}")
            full = spread(total, self.n)
            kinds = tuple(FULL if i in full else FAMILIES[self.family] for i in range(total))
        elif self.family == "deepcache":
            kinds = tuple(FULL if i % self.n == 0 else SHALLOW for i in range(total))
        elif self.family == "at":
            bad = [i for i in self.indices if not 0 <= i < total]
            if bad:
                raise InputError(f"schedule {self.spec!r}: step indices {bad} are out of range 0..{total - 1} "
                                 f"(the run has {total} steps; index {total - 1} is the first)")
            kinds = tuple(FULL if total - 1 - i in self.indices else REUSE_EPS for i in range(total))
        else:
            if len(self.kinds) != total:
                raise InputError(f"schedule {self.spec!r} names {len(self.kinds)} steps; the run has {total}")
            kinds = self.kinds
        if kinds[0] != FULL:
            raise InputError(f"schedule {self.spec!r}: the first step must be full (nothing to reuse yet), "
                             f"got {kinds[0]}")
        return kinds

    @property
    def is_full(self) -> bool:
        return self.family == FULL


def _int(term: str, value: str, minimum: int) -> int:
    if not value.isdigit() or int(value) < minimum:
        raise InputError(f"schedule term {term!r}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def parse_schedule(text: str) -> Schedule:
    """A Schedule from its spelling (see the module docstring); bad spellings list the valid ones."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"schedule must be a non-empty string ({SPELLINGS}), got {text!r}")
    steps: int | None = None
    rule: Schedule | None = None
    for term in text.replace(" ", "").split("+"):
        name, eq, value = term.partition("=")
        at_name, at, at_value = term.partition("@")
        if name == "steps" and eq:
            if steps is not None:
                raise InputError(f"schedule {text!r} gives steps= twice")
            steps = _int(term, value, 1)
            continue
        if term == FULL:
            candidate = Schedule(FULL)
        elif name in FAMILIES and eq:
            candidate = Schedule(f"{name}={_int(term, value, 1)}", family=name, n=int(value))
        elif name == "deepcache" and eq:
            candidate = Schedule(f"deepcache={_int(term, value, 1)}", family="deepcache", n=int(value))
        elif at_name == FULL and at:
            parts = at_value.split(",")
            indices = tuple(sorted({_int(term, p, 0) for p in parts}, reverse=True))
            candidate = Schedule("full@" + ",".join(map(str, indices)), family="at", indices=indices)
        elif name == "kinds" and eq:
            unknown = sorted(set(value) - set(LETTERS))
            if unknown or not value:
                raise InputError(f"schedule term {term!r}: unknown step letters {unknown or value!r}; use "
                                 + ", ".join(f"{k} ({v})" for k, v in LETTERS.items()))
            candidate = Schedule(f"kinds={value}", family="kinds", kinds=tuple(LETTERS[c] for c in value))
        else:
            raise InputError(f"unknown schedule term {term!r} in {text!r}; valid: {SPELLINGS}")
        if rule is not None:
            raise InputError(f"schedule {text!r} has two step rules ({rule.spec} and {candidate.spec}); give one")
        rule = candidate
    rule = rule or Schedule(FULL)
    if steps is None:
        return rule
    spec = f"steps={steps}" if rule.is_full else f"steps={steps}+{rule.spec}"
    return Schedule(spec, steps, rule.family, rule.n, rule.indices, rule.kinds)


def kinds_spelling(kinds: tuple[str, ...] | list[str]) -> str:
    """The `kinds=...` spelling of an explicit list of step kinds."""
    letters = {kind: letter for letter, kind in LETTERS.items()}
    unknown = [k for k in kinds if k not in letters]
    if unknown:
        raise InputError(f"unknown step kinds {unknown}; valid: {', '.join(KINDS)}")
    return "kinds=" + "".join(letters[k] for k in kinds)


def schedule_file_sampler(path: str | Path) -> str | None:
    """The sampler a schedule file names (`sdcn-trt tune` writes the one it measured), None where it names none."""
    data = json.loads(Path(path).read_text())  # after load_schedule_file: readable JSON
    sampler = data.get("sampler") if isinstance(data, dict) else None
    return sampler if isinstance(sampler, str) else None


def load_schedule_file(path: str | Path) -> str:
    """The schedule spelling held in a JSON file (as `sdcn-trt tune` writes it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read schedule file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise InputError(f"schedule file {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("schedule"), str):
        spelling = data["schedule"]
    elif isinstance(data, dict) and isinstance(data.get("kinds"), list):
        spelling = kinds_spelling(data["kinds"])
        if "ddim_steps" in data:
            spelling = f"steps={data['ddim_steps']}+{spelling}"
    else:
        raise InputError(f"schedule file {path} must hold {{\"schedule\": \"...\"}} or "
                         f"{{\"ddim_steps\": N, \"kinds\": [...]}}")
    parse_schedule(spelling)
    return spelling
