"""Canny-to-image over folders: prompt files, a JSONL manifest (a row for every file: done, failed or
skipped, with the reason), crash-safe resume, one run per folder."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import filelock

from sdcn_trt.cache import hash_json
from sdcn_trt.config import SEED_MAX, GenerationConfig
from sdcn_trt.errors import InputError, SdcnError
from sdcn_trt.images import save_image
from sdcn_trt.pipeline.batched import BatchItem
from sdcn_trt.preprocess import FolderEntry, read_image, resize_shape, scan_folder

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
LOCK = ".sdcn_batch.lock"
LOCK_OWNER = ".sdcn_batch.owner"  # "pid N" of the run holding LOCK, for the refusal message
STALE_WRITE = re.compile(r"\..+\.png\.[a-z0-9_]{8}\.tmp")  # cache.atomic_path's temporary beside an output PNG


@dataclass
class BatchSettings:
    """A batch job; flag names equal field names."""

    input_dir: str
    output_dir: str
    prompts: str | None = None  # CSV (file,prompt[,n_prompt][,seed]) or JSONL with the same keys
    save_control: bool = False  # also write <name>_canny.png (the inverted edge map)
    recursive: bool = True
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 1  # photos per network call: queued files of one size and settings are grouped

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class Job:
    """One input image and everything that decides its output."""

    source: str  # path relative to input_dir
    config: GenerationConfig

    @property
    def key(self) -> str:
        """Identifies the result: a finished job with the same key is not redone."""
        return hash_json({"source": self.source, "config": dataclasses.asdict(self.config)})[:16]

    def output(self, root: Path) -> Path:
        return root / Path(self.source).with_suffix(".png")

    def control_output(self, root: Path) -> Path:
        return root / Path(self.source).with_name(Path(self.source).stem + "_canny.png")


# -- prompt files ----------------------------------------------------------------------------------
def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{number}: expected a JSON object")
                yield number, row
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            for number, row in enumerate(csv.DictReader(f), 2):
                yield number, {k.strip(): v for k, v in row.items() if k is not None and v not in (None, "")}
    else:
        raise InputError(f"prompt file must be .csv or .jsonl, got {path.name}")


def read_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    """file name (relative path) -> {prompt, n_prompt, seed}; every bad row is reported at once."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}")
    table, errors = {}, []
    for number, row in _rows(path):
        name = row.get("file")
        if not name:
            errors.append(f"line {number}: no 'file'")
            continue
        entry: dict[str, Any] = {}
        if "prompt" in row:
            entry["prompt"] = str(row["prompt"])
        for key in ("n_prompt", "negative_prompt"):
            if key in row:
                entry["n_prompt"] = str(row[key])
        if "seed" in row:
            try:
                entry["seed"] = int(row["seed"])
            except (TypeError, ValueError):
                errors.append(f"line {number}: seed {row['seed']!r} is not an integer")
                continue
            if not 0 <= entry["seed"] <= SEED_MAX:
                errors.append(f"line {number}: seed {entry['seed']} is outside 0..{SEED_MAX}")
                continue
        if name in table:
            errors.append(f"line {number}: {name} appears twice")
        table[str(name)] = entry
    if errors:
        raise InputError(f"bad rows in {path}: " + "; ".join(errors[:20]) + (" ..." if len(errors) > 20 else ""))
    return table


def plan_batch(settings: BatchSettings) -> tuple[list[Job], list[FolderEntry]]:
    """(one job per image under input_dir with its prompt-file row applied, the other entries and why
    each is skipped). A folder with no image at all is an error naming what it holds instead."""
    root = Path(settings.input_dir)
    check_folders_apart(root, Path(settings.output_dir), settings.recursive)
    entries = scan_folder(root, recursive=settings.recursive)
    files = [e.path for e in entries if e.skip is None]
    skipped = [e for e in entries if e.skip is not None]
    if not files:
        raise no_images_error(root, skipped)
    relative = [str(p.relative_to(root)) for p in files]
    check_clashes([(root, Job(rel, settings.generation)) for rel in relative])
    overrides = read_prompts(settings.prompts) if settings.prompts else {}
    missing = sorted(set(overrides) - set(relative) - {Path(r).name for r in relative})
    if missing:
        logger.warning("prompt file names %d images that are not in %s: %s", len(missing), root, ", ".join(missing[:10]))
    jobs = []
    for rel in relative:
        row = overrides.get(rel, overrides.get(Path(rel).name, {}))
        jobs.append(Job(rel, settings.generation.replace(**row)))
    return jobs, skipped


def no_images_error(root: Path, skipped: list[FolderEntry]) -> InputError:
    """The error for a folder with no image to run, naming (up to five of) the entries it holds instead."""
    held = "; ".join(f"{e.path.relative_to(root)}: {e.skip}" for e in skipped[:5])
    return InputError(f"no images found in {root}" + (f" ({len(skipped)} other entries: {held}"
                                                        f"{' ...' if len(skipped) > 5 else ''})" if skipped else ""))


def check_folders_apart(input_root: Path, output_root: Path, recursive: bool) -> None:
    """InputError for an output folder that is the input folder or (recursive) inside it: its images
    would be read as inputs by the next run, and an input `x.png` would be overwritten by its own output."""
    inputs, outputs = input_root.resolve(), output_root.resolve()
    if outputs == inputs:
        raise InputError(f"output folder {output_root} is the input folder: an input .png would be overwritten by "
                         "its own output, and the outputs read as inputs by the next run; give another output folder")
    if recursive and inputs in outputs.parents:
        raise InputError(f"output folder {output_root} is inside the input folder {input_root}: the next run would "
                         "read its outputs as inputs; give an output folder outside it, or pass --no-recursive")


def skipped_record(entry: FolderEntry, input_root: Path) -> dict[str, Any]:
    """The manifest row of an entry that is not run: its path, status "skipped" and the reason."""
    source = str(entry.path.relative_to(input_root))
    return {"key": hash_json({"source": source, "skipped": True})[:16], "input": source, "status": "skipped",
            "reason": entry.skip, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


# -- manifest and lock -----------------------------------------------------------------------------
class Manifest:
    """Append-only JSONL; the last record of a job key wins. Each append is flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self.records[record["key"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that job simply is not done
        self._file = open(path, "a")
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # close a line a kill cut short, so the next record starts clean

    def done(self, job: Job, output_root: Path) -> bool:
        record = self.records.get(job.key)
        return bool(record and record["status"] == "done" and job.output(output_root).is_file())

    def append(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class OutputLock:
    """An exclusive lock on the output folder: a second run on it is refused, not interleaved.

    The lock is filelock's (flock, or a soft lock where the filesystem has none); it goes when the
    process dies. The holder writes its pid beside it so the refusal can name it."""

    def __init__(self, folder: Path):
        self._owner = folder / LOCK_OWNER
        self._lock = filelock.FileLock(folder / LOCK, timeout=0)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except filelock.Timeout:
            try:
                owner = self._owner.read_text().strip()
            except OSError:
                owner = ""
            raise InputError(f"another batch run ({owner or 'another process'}) is writing to {folder}; "
                             "wait for it or use another folder") from None
        except OSError as exc:
            raise InputError(f"output folder {folder} is not writable: {exc.strerror}") from exc
        self._owner.write_text(f"pid {os.getpid()}")

    def release(self) -> None:
        self._owner.unlink(missing_ok=True)
        self._lock.release()


# -- running ---------------------------------------------------------------------------------------
def write_outputs(result: Any, job: Job, output_root: Path, save_control: bool) -> list[Path]:
    """Write a job's images atomically: <source>.png, then <source>_1.png ... for further samples,
    and <source>_canny.png (the inverted edge map) with save_control. Returns the paths written."""
    output = save_image(job.output(output_root), result.images[0])
    written = [output]
    for i, extra in enumerate(result.images[1:], 1):
        written.append(save_image(output.with_name(f"{output.stem}_{i}.png"), extra))
    if save_control:
        written.append(save_image(job.control_output(output_root), 255 - result.control))
    return written


def jobs_for_paths(paths: list[str] | list[Path], config: GenerationConfig) -> list[tuple[Path, Job]]:
    """(input root, job) for image files and folders given on a command line: a file is its own job,
    a folder's images are named relative to it (as in a batch). Two inputs that would write the same
    output are refused before any work."""
    planned: list[tuple[Path, Job]] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            entries = scan_folder(path)
            images = [(path, Job(str(e.path.relative_to(path)), config)) for e in entries if e.skip is None]
            if not images:  # a folder named on the command line with nothing to run is a mistake, not a no-op
                raise no_images_error(path, [e for e in entries if e.skip is not None])
            for entry in entries:
                if entry.skip is not None:
                    logger.warning("skipped %s: %s", entry.path, entry.skip)
            planned += images
        else:
            planned.append((path.parent, Job(path.name, config)))
    check_clashes(planned)
    return planned


def check_inputs_kept(planned: list[tuple[Path, Job]], output_root: Path) -> None:
    """InputError, before any work, for an input whose output would be written over it (`cat.png -o .`)."""
    overwritten = [str(root / job.source) for root, job in planned
                   if job.output(output_root).resolve() == (root / job.source).resolve()]
    if overwritten:
        raise InputError(f"the output of {', '.join(overwritten)} would be written over the input itself "
                         f"({output_root} is its folder); give another output folder")


def check_clashes(planned: list[tuple[Path, Job]]) -> None:
    """InputError, before any work, for inputs that would write the same output (cat.jpg and cat.png)."""
    sources: dict[Path, list[str]] = {}
    for root, job in planned:
        sources.setdefault(job.output(Path()), []).append(str(root / job.source))
    clashes = {out: names for out, names in sources.items() if len(names) > 1}
    if clashes:
        raise InputError("inputs would overwrite each other's outputs: " + "; ".join(
            f"{', '.join(names)} -> {out}" for out, names in clashes.items()) + "; rename them or run them apart")


def run_job(pipe: Any, job: Job, input_root: Path, output_root: Path, save_control: bool) -> dict[str, Any]:
    """Generate one job's image(s) and write them atomically; return its manifest record."""
    clock = time.perf_counter()
    record: dict[str, Any] = {"key": job.key, "input": job.source, "seed": job.config.seed,
                              "settings": dataclasses.asdict(job.config)}
    try:
        loaded = read_image(input_root / job.source)
        if loaded.notes:  # how the file was read: first of N frames, 16-bit scaled, OpenCV's warnings
            record["notes"] = list(loaded.notes)
        result = pipe.run(loaded.image, job.config)
        output = write_outputs(result, job, output_root, save_control)[0]
        record.update(status="done", output=str(output.relative_to(output_root)), seed=result.seed)
    except SdcnError as exc:
        record.update(status="failed", error=str(exc))
    record.update(seconds=time.perf_counter() - clock, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return record


def group_key(job: Job, image: Any) -> str:
    """Jobs with equal keys can share a network call: the same preprocessed size and the same settings
    apart from what may differ per photo (prompt, negative prompt, seed)."""
    config = job.config
    height, width, _ = resize_shape(image.shape[0], image.shape[1], config.image_resolution)
    shared = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("prompt", "n_prompt", "seed")}
    return hash_json({"size": [height, width], "settings": shared})


def run_group(pipe: Any, group: list[tuple[Job, Any]], input_root: Path, output_root: Path,
              save_control: bool) -> list[dict[str, Any]]:
    """One network call for jobs of one group key (pipe.run_batch; a lone job: run_job), each job's images
    written as run_job writes them; if the call fails, each job runs alone, so a bad file fails alone and
    the rest of its group still runs."""
    if len(group) == 1:
        return [run_job(pipe, group[0][0], input_root, output_root, save_control)]
    clock = time.perf_counter()
    items = [BatchItem(loaded.image, prompt=job.config.prompt, n_prompt=job.config.n_prompt, seed=job.config.seed)
             for job, loaded in group]
    try:
        results = pipe.run_batch(items, group[0][0].config, batch_size=len(group))
    except SdcnError as exc:
        logger.warning("a group of %d images failed (%s); running them one by one", len(group), exc)
        return [run_job(pipe, job, input_root, output_root, save_control) for job, _ in group]
    seconds = (time.perf_counter() - clock) / len(group)
    records = []
    for (job, loaded), result in zip(group, results, strict=True):
        record: dict[str, Any] = {"key": job.key, "input": job.source, "seed": job.config.seed,
                                  "settings": dataclasses.asdict(job.config)}
        if loaded.notes:
            record["notes"] = list(loaded.notes)
        try:
            output = write_outputs(result, job, output_root, save_control)[0]
            record.update(status="done", output=str(output.relative_to(output_root)), seed=result.seed)
        except SdcnError as exc:
            record.update(status="failed", error=str(exc))
        record.update(seconds=seconds, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        records.append(record)
    return records


def run_jobs(pipe: Any, jobs: list[Job], input_root: Path, output_root: Path, save_control: bool,
             batch_size: int = 1) -> Iterator[dict[str, Any]]:
    """Records of `jobs`, each yielded once its images are written. batch_size 1: one call per job, in order;
    more: jobs queue by group key and a group runs when it holds batch_size jobs (the rest at the end)."""
    if batch_size == 1:
        yield from (run_job(pipe, job, input_root, output_root, save_control) for job in jobs)
        return
    queued: dict[str, list[tuple[Job, Any]]] = {}
    for job in jobs:
        try:
            loaded = read_image(input_root / job.source)
            key = group_key(job, loaded.image)
        except SdcnError as exc:
            yield {"key": job.key, "input": job.source, "seed": job.config.seed,
                   "settings": dataclasses.asdict(job.config), "status": "failed", "error": str(exc), "seconds": 0.0,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            continue
        group = queued.setdefault(key, [])
        group.append((job, loaded))
        if len(group) == batch_size:
            yield from run_group(pipe, queued.pop(key), input_root, output_root, save_control)
    for group in queued.values():
        yield from run_group(pipe, group, input_root, output_root, save_control)


@dataclass
class BatchSummary:
    total: int  # images
    done: int  # finished in this run
    skipped: int  # already done before this run
    failed: int
    seconds: float
    skipped_files: int = 0  # entries that are not images or cannot be read as files: "skipped" manifest rows

    def __str__(self) -> str:
        return (f"{self.total} images: {self.done} done, {self.skipped} already done, {self.failed} failed; "
                f"{self.skipped_files} other files skipped (see the manifest) in {self.seconds:.1f} s")


def run_batch(pipe: Any, settings: BatchSettings, runner: Any = None) -> BatchSummary:
    """Run every pending job (locally, or through `runner`, e.g. a RayRunner), recording each one."""
    from tqdm.auto import tqdm

    clock = time.perf_counter()
    jobs, not_run = plan_batch(settings)  # bad prompt files fail here, before anything is written
    output_root, input_root = Path(settings.output_dir), Path(settings.input_dir)
    lock = OutputLock(output_root)
    for stale in output_root.rglob(".*.tmp"):  # atomic writes a killed run left half-done, and nothing else:
        if STALE_WRITE.fullmatch(stale.name) and stale.is_file() and not stale.is_symlink():  # a user's .notes.tmp
            stale.unlink()  # or a folder named like one stays
    manifest = Manifest(output_root / MANIFEST)
    try:
        pending = [j for j in jobs if not manifest.done(j, output_root)]
        skipped = len(jobs) - len(pending)
        done = failed = 0
        bar = tqdm(total=len(pending), desc="batch", unit="image")
        for entry in not_run:  # every file gets a row; one already recorded with the same reason is not repeated
            record = skipped_record(entry, input_root)
            if manifest.records.get(record["key"], {}).get("reason") != record["reason"]:
                manifest.append(record)
                bar.write(f"skipped: {record['input']}: {record['reason']}")
        results = (runner.map(pending, input_root, output_root, settings.save_control, settings.batch_size)
                   if runner is not None
                   else run_jobs(pipe, pending, input_root, output_root, settings.save_control, settings.batch_size))
        for record in results:
            manifest.append(record)
            done += record["status"] == "done"
            failed += record["status"] == "failed"
            if record["status"] == "failed":
                bar.write(f"failed: {record['input']}: {record['error']}")
            bar.update(1)
        bar.close()
    finally:
        manifest.close()
        lock.release()
    return BatchSummary(len(jobs), done, skipped, failed, time.perf_counter() - clock, len(not_run))
