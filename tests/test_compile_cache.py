"""torch.compile's caches in the sdcn_trt cache (engines.compile_cache): keyed folders, private to the user, a
second process compiling from the first's cache, Mega-Cache files checked by hash, and the failures that
must cost a compile, never the run."""
import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch

from sdcn_trt.engines import compile_cache as cc
from sdcn_trt.engines.torch import TorchRunner
from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor

CHILD = """
import json, sys, time
from torch._dynamo.utils import counters
from sdcn_trt.models.presets import load_preset
from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor
from sdcn_trt.engines.torch import TorchRunner
d = get_descriptor("control_hint", load_preset("tiny", seed=0))
runner = TorchRunner(d, compile="default")
runner.activate()
clock = time.perf_counter()
out = runner.infer(d.sample_inputs(ShapeSpec(1, 64, 64)))["hint"]
print(json.dumps({"first_call_s": time.perf_counter() - clock, "folder": str(runner.compile_cache),
                  "hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "out": out.flatten()[:64].tolist()}))
"""


def _child(cache, tmp):
    """CHILD in a fresh process with the sdcn_trt cache `cache` and a temp folder of its own (where inductor's
    caches went before: a new temp folder compiled everything again)."""
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != cc.INDUCTOR_ENV}
    env.update(SDCN_TRT_CACHE=str(cache), TMPDIR=str(tmp))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_compiles_from_the_first_ones_cache(tmp_path):
    first = _child(tmp_path / "cache", tmp_path / "tmp1")
    second = _child(tmp_path / "cache", tmp_path / "tmp2")
    assert (first["hit"], first["miss"]) == (0, 1)
    assert (second["hit"], second["miss"]) == (1, 0)  # inductor's FX-graph cache: nothing compiled again
    assert second["out"] == first["out"] and first["folder"] == second["folder"]
    folder = tmp_path / "cache" / "torch_compile" / os.path.basename(first["folder"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 == stat.S_IMODE(folder.parent.stat().st_mode)
    (record,) = (folder / cc.ARTIFACTS).glob("control_hint-*.json")
    assert json.loads(record.read_text())["key"]["network"] == "control_hint"
    assert json.loads((folder / "key.json").read_text())["torch"] == torch.__version__


def test_the_folder_key_tells_torch_triton_python_and_device_apart(tmp_path):
    cpu = {"type": "cpu", "machine": "x86_64", "model": "A"}
    h100 = {"type": "cuda", "name": "NVIDIA H100", "capability": [9, 0], "cuda": "13.0"}
    base = cc.compile_cache_key(cpu, "2.14.1", None, "3.11")
    others = [cc.compile_cache_key(cpu, "2.11.0", None, "3.11"), cc.compile_cache_key(cpu, "2.14.1", "3.5.0", "3.11"),
              cc.compile_cache_key(cpu, "2.14.1", None, "3.12"), cc.compile_cache_key({**cpu, "model": "B"}, "2.14.1", None, "3.11"),
              cc.compile_cache_key(h100, "2.14.1", None, "3.11")]
    folders = {cc.compile_cache_dir(key, tmp_path) for key in [base, *others]}
    assert len(folders) == 6 and cc.compile_cache_dir(base, tmp_path) in folders
    assert any(f.name.startswith("torch2.14.1-cuda-sm90-") for f in folders)
    assert cc.device_identity(torch.device("cpu"))["type"] == "cpu"


def _write_artifact(folder, name, blob, sha256=None):
    (folder / cc.ARTIFACTS).mkdir(parents=True, exist_ok=True)
    (folder / cc.ARTIFACTS / f"{name}.bin").write_bytes(blob)
    import hashlib

    digest = sha256 or hashlib.sha256(blob).hexdigest()
    (folder / cc.ARTIFACTS / f"{name}.json").write_text(json.dumps({"sha256": digest, "key": {}}))


def test_a_changed_or_unloadable_artifact_file_is_discarded_with_a_warning(tmp_path, caplog):
    _write_artifact(tmp_path, "truncated", b"abc", sha256="0" * 64)
    _write_artifact(tmp_path, "garbage", b"not a mega-cache")  # its hash matches; torch refuses the bytes
    (tmp_path / cc.ARTIFACTS / "unreadable.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger=cc.__name__):
        assert cc.load_artifacts(tmp_path) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == cc.__name__]  # torch logs its own refusal too
    assert len(messages) == 3 and all(m.startswith("compile cache: discarded ") for m in messages)
    assert any("truncated.bin's sha256 does not match its record" in m for m in messages)
    assert list((tmp_path / cc.ARTIFACTS).iterdir()) == []  # rebuilt by the next compile, never loaded


def test_a_cache_dir_the_user_set_is_theirs(tmp_path, monkeypatch):
    monkeypatch.setenv(cc.INDUCTOR_ENV, str(tmp_path / "mine"))
    assert cc.use_compile_cache(torch.device("cpu"), tmp_path / "root") is None
    assert os.environ[cc.INDUCTOR_ENV] == str(tmp_path / "mine") and not (tmp_path / "root").exists()
    monkeypatch.delenv(cc.INDUCTOR_ENV)
    folder = cc.use_compile_cache(torch.device("cpu"), tmp_path / "root")
    assert os.environ[cc.INDUCTOR_ENV] == str(folder / "inductor")
    assert cc.use_compile_cache(torch.device("cpu"), tmp_path / "root") == folder  # ours again, not "the user's"


def test_a_folder_it_cannot_write_is_refused_and_inductor_keeps_its_own(tmp_path, monkeypatch):
    """A prebuilt cache shared read-only: inductor writes into its cache folder as it runs (the CPU probe, new
    kernels), so the folder is refused (the runners warn and go on) and TORCHINDUCTOR_CACHE_DIR is left alone."""
    monkeypatch.setenv(cc.INDUCTOR_ENV, "recorded, so that the test ends with the value it started with")
    monkeypatch.delenv(cc.INDUCTOR_ENV)
    monkeypatch.setattr(cc.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="the compile cache folder is not writable"):
        cc.use_compile_cache(torch.device("cpu"), tmp_path / "root")
    assert cc.INDUCTOR_ENV not in os.environ


def test_saving_nothing_or_failing_to_save_costs_no_run(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert cc.save_artifacts(tmp_path, "x", {}) is None and not (tmp_path / cc.ARTIFACTS).exists()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cc, "save_artifacts", full_disk)
    monkeypatch.setattr(cc, "compiled_anything_new", lambda: True)  # whatever earlier tests left in the cache
    desc = get_descriptor("control_hint", tiny)
    runner = TorchRunner(desc, compile="default")
    with caplog.at_level(logging.WARNING, logger="sdcn_trt.engines.torch"):
        out = runner.infer(desc.sample_inputs(ShapeSpec(1, 64, 64)))["hint"]
    assert out.shape[0] == 1 and runner.compile_cache is not None
    assert "compile cache: could not save torch.compile's artifacts" in caplog.text and "No space left" in caplog.text


def test_a_save_writes_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"bytes of a cache", None))
    target = cc.save_artifacts(tmp_path, "net", {"network": "net"})
    assert target.read_bytes() == b"bytes of a cache"
    assert json.loads(target.with_suffix(".json").read_text())["bytes"] == 16

    def broken_write(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(target), "write_bytes", broken_write)
    with pytest.raises(OSError):
        cc.save_artifacts(tmp_path, "other", {})
    assert sorted(p.name for p in (tmp_path / cc.ARTIFACTS).iterdir()) == ["net.bin", "net.json"]  # no half entry


def test_the_backends_cache_dir_holds_the_compile_cache(tiny, tmp_path, monkeypatch):
    from sdcn_trt import BackendConfig
    from sdcn_trt.engines import create_runner

    monkeypatch.delenv(cc.INDUCTOR_ENV, raising=False)
    runner = create_runner(get_descriptor("control_hint", tiny), BackendConfig(compile="default", cache_dir=str(tmp_path)))
    runner.activate()  # compiles nothing yet: that happens at the first call
    assert runner.compile_cache.parent == tmp_path / "torch_compile"
    assert os.environ[cc.INDUCTOR_ENV] == str(runner.compile_cache / "inductor")
    eager = create_runner(get_descriptor("control_hint", tiny), BackendConfig(cache_dir=str(tmp_path / "eager")))
    eager.activate()
    assert eager.compile_cache is None and not (tmp_path / "eager").exists()  # nothing compiles: no cache folder


def test_a_cache_it_cannot_use_costs_a_warning_not_the_run(tiny, monkeypatch, caplog):
    """A read-only cache, or another user's private one: torch.compile runs with its own caches."""
    def read_only(device, root=None):
        raise PermissionError(13, "Permission denied", "/shared/cache/torch_compile")

    monkeypatch.setattr(cc, "use_compile_cache", read_only)
    desc = get_descriptor("control_hint", tiny)
    runner = TorchRunner(desc, compile="default")
    with caplog.at_level(logging.WARNING, logger="sdcn_trt.engines.torch"):
        runner.activate()
    assert runner.is_active and runner.compile_cache is None
    assert "compile cache: cannot use" in caplog.text and "Permission denied" in caplog.text
    eager = TorchRunner(desc, fast=None)
    eager.activate()
    assert eager.compile_cache is None  # nothing compiles: the compile cache is not even looked at
