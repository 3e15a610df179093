"""Start-up: memory-mapped reads, networks built empty, the converted-weights cache (hit, stale,
corrupt, unwritable), lazy weights that cached exports never read, and files that are not checkpoints."""
import io
import json
import logging
import zipfile

import numpy as np
import pytest
import torch

from sdcn_trt import ControlNetPipeline, GenerationConfig, WeightsError
from sdcn_trt.cache import hash_file_cached
from sdcn_trt.models.single_file import load_single_file, read_state_dict
import sdcn_trt.models.components as components_module
from sdcn_trt.models.components import Components, is_empty
from sdcn_trt.export.descriptors import get_descriptor
from sdcn_trt.export.onnx_export import ExportSettings, export_key
from sdcn_trt.models.ldm_layout import save_single_file
from sdcn_trt.models.presets import load_preset
from sdcn_trt.models.weights import write_safetensors
from sdcn_trt.models.weights_cache import WEIGHTS_FILE, entry_folder


def same_weights(a: Components, b: Components, precision: str = "fp32") -> None:
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        dtype = torch.float16 if precision == "fp16" and name != "text_encoder" else torch.float32
        for key in sa:
            expected = sa[key].to(dtype) if sa[key].is_floating_point() else sa[key]
            assert sb[key].dtype == expected.dtype and torch.equal(sb[key], expected), f"{name}.{key}"


def entries(cache) -> list[str]:
    folder = cache / "weights"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("startup") / "tiny.pth"
    save_single_file(tiny, path)
    return path


# ---------------------------------------------------------------------------------------------
# The weights cache
# ---------------------------------------------------------------------------------------------
def test_first_load_writes_the_cache_and_the_next_maps_it(tiny, ckpt, tmp_path, caplog):
    cold = load_single_file(ckpt, cache=False)  # converted from the file itself
    assert cold.is_loaded() and entries(tmp_path) == []
    first = load_single_file(ckpt, cache_dir=tmp_path)
    assert entries(tmp_path) == [f"{first.weights_id()[:24]}-fp32"]
    with caplog.at_level(logging.DEBUG, logger="sdcn_trt"):  # a cache hit: a debug line
        warm = load_single_file(ckpt, cache_dir=tmp_path)
    assert "using weights cache entry" in caplog.text
    assert not warm.is_loaded()  # nothing read yet: the networks are filled on first use
    assert warm.peek("unet").config.block_out_channels == [32, 64]  # configs are there without weights
    same_weights(tiny, cold)
    same_weights(tiny, warm)
    assert warm.is_loaded() and cold.weights_id() == warm.weights_id() == first.weights_id()


def test_fp16_entry_holds_fp16_weights_and_fp32_clip(tiny, ckpt, tmp_path):
    cold = load_single_file(ckpt, precision="fp16", cache=False)
    load_single_file(ckpt, precision="fp16", cache_dir=tmp_path)
    warm = load_single_file(ckpt, precision="fp16", cache_dir=tmp_path)
    assert not warm.is_loaded() and entries(tmp_path)[0].endswith("-fp16")
    same_weights(tiny, cold, "fp16")
    same_weights(tiny, warm, "fp16")
    # an fp16 export reads the same weights either way; an fp32 export of rounded weights does not
    fp32 = load_single_file(ckpt, cache_dir=tmp_path)
    assert warm.weights_id("fp16") == fp32.weights_id("fp16") and warm.weights_id() != fp32.weights_id()


def test_changed_file_is_converted_again(tiny, tmp_path):
    path = tmp_path / "model.safetensors"
    save_single_file(tiny, path)
    first = load_single_file(path, cache_dir=tmp_path / "cache")
    other = load_preset("tiny", seed=1, cache=False)
    save_single_file(other, path)  # same name, same size, new content
    again = load_single_file(path, cache_dir=tmp_path / "cache")
    assert again.weights_id() != first.weights_id() and len(entries(tmp_path / "cache")) == 2
    same_weights(other, again)


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "meta", "no_meta"])
def test_damaged_entry_is_detected_and_rebuilt(tiny, ckpt, tmp_path, caplog, damage):
    first = load_single_file(ckpt, cache_dir=tmp_path)
    folder = entry_folder(tmp_path, first.weights_id(), "fp32")
    weights = folder / WEIGHTS_FILE
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "overwrite":  # same size, other bytes in the middle
        data = bytearray(weights.read_bytes())
        data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
        weights.write_bytes(bytes(data))
    elif damage == "meta":
        (folder / "meta.json").write_text("{not json")
    else:
        (folder / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="sdcn_trt"):
        again = load_single_file(ckpt, cache_dir=tmp_path)
    assert f"weights cache entry {folder} is not usable" in caplog.text and "rebuilding it" in caplog.text
    same_weights(tiny, again)
    assert not load_single_file(ckpt, cache_dir=tmp_path).is_loaded()  # rebuilt: a hit again


def test_unwritable_cache_is_a_warning_and_loading_goes_on(tiny, ckpt, tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would be")
    with caplog.at_level(logging.WARNING, logger="sdcn_trt"):
        loaded = load_single_file(ckpt, cache_dir=blocker / "cache")
    assert "cannot write the weights cache entry" in caplog.text and "loading goes on without it" in caplog.text
    assert loaded.is_loaded()
    same_weights(tiny, loaded)


def test_no_cache_reads_and_writes_nothing(tiny, ckpt, tmp_path):
    loaded = load_single_file(ckpt, cache=False, cache_dir=tmp_path)
    assert loaded.is_loaded() and not (tmp_path / "weights").exists()


def test_cli_no_cache_flag(ckpt, tmp_path):
    from sdcn_trt.cli import build_parser, load_components

    args = build_parser().parse_args(["export", "--checkpoint", str(ckpt), "--cache-dir", str(tmp_path), "--no-cache"])
    assert load_components(args).is_loaded() and not (tmp_path / "weights").exists()
    args = build_parser().parse_args(["export", "--checkpoint", str(ckpt), "--cache-dir", str(tmp_path)])
    load_components(args)
    assert len(entries(tmp_path)) == 1


def test_presets_are_drawn_once(tiny, tmp_path):
    drawn = load_preset("tiny", seed=0, cache_dir=tmp_path)
    mapped = load_preset("tiny", seed=0, cache_dir=tmp_path)
    assert drawn.is_loaded() and not mapped.is_loaded()
    same_weights(tiny, drawn)
    same_weights(tiny, mapped)
    assert mapped.weights_id() == drawn.weights_id() != load_preset("tiny", seed=1, cache_dir=tmp_path).weights_id()
    half = load_preset("tiny", seed=0, precision="fp16", cache_dir=tmp_path)
    same_weights(tiny, half, "fp16")
    same_weights(tiny, load_preset("tiny", seed=0, precision="fp16", cache_dir=tmp_path), "fp16")


def test_content_hash_is_read_once(tmp_path, monkeypatch):
    import sdcn_trt.cache as cache

    path = tmp_path / "file.bin"
    path.write_bytes(b"abc" * 1000)
    calls = []
    real = cache.hash_file
    monkeypatch.setattr(cache, "hash_file", lambda p: calls.append(p) or real(p))
    first = hash_file_cached(path, tmp_path / "memo")
    assert hash_file_cached(path, tmp_path / "memo") == first and len(calls) == 1
    path.write_bytes(b"abd" * 1000)  # same size, new content: mtime/ctime change
    assert hash_file_cached(path, tmp_path / "memo") != first and len(calls) == 2


# ---------------------------------------------------------------------------------------------
# Lazy weights: keys without reading, loading on first use, changes in place noticed
# ---------------------------------------------------------------------------------------------
def test_export_keys_read_no_weights(tiny, tmp_path):
    load_preset("tiny", seed=0, cache_dir=tmp_path)
    lazy = load_preset("tiny", seed=0, cache_dir=tmp_path)
    for name in ("text_encoder", "fused_step", "vae_decoder"):
        for precision in ("fp32", "fp16"):
            settings = ExportSettings(precision=precision)
            assert export_key(get_descriptor(name, lazy), settings) == export_key(get_descriptor(name, tiny), settings)
    assert not lazy.is_loaded()


def test_weights_changed_in_place_get_a_new_key(tmp_path):
    lazy = load_preset("tiny", seed=0, cache_dir=tmp_path)
    key = lazy.weights_id()
    with torch.no_grad():
        lazy.unet.conv_in.weight.add_(1.0)  # loads the UNet, then changes it
    assert lazy.weights_id() != key
    assert Components(lazy.tokenizer, *lazy.modules().values()).weights_id() == lazy.weights_id()  # = tensor hash


def test_changed_weights_are_hashed_once_per_change(tiny, monkeypatch):
    hashed = []
    real = components_module.hash_module
    monkeypatch.setattr(components_module, "hash_module", lambda m: hashed.append(m) or real(m))
    model = Components(tiny.tokenizer, *(load_preset("tiny", seed=0).modules().values()), weights_key="k")
    with torch.no_grad():
        model.unet.conv_in.weight.add_(1.0)
    first = model.weights_id()
    assert len(hashed) == 4  # every network once
    assert model.weights_id() == first and len(hashed) == 4  # nothing changed since: no hashing
    with torch.no_grad():
        model.vae.decoder.conv_out.bias.add_(1.0)
    assert model.weights_id() != first and hashed[4:] == [model.vae]  # only the changed network again


def test_empty_networks_need_a_loader(tmp_path):
    lazy = load_preset("tiny", seed=0, cache_dir=tmp_path)
    lazy = load_preset("tiny", seed=0, cache_dir=tmp_path)
    assert is_empty(lazy.peek("vae"))
    with pytest.raises(ValueError, match=r"networks \['text_encoder', 'unet', 'controlnet', 'vae'\] have no weights"):
        Components(lazy.tokenizer, *(lazy.peek(n) for n in ("text_encoder", "unet", "controlnet", "vae")))


def test_torch_runner_uses_fp16_weights_without_a_copy(ckpt, tmp_path, photo):
    pipe = ControlNetPipeline.from_single_file(ckpt, backend="torch", precision="fp16", cache_dir=str(tmp_path))
    assert pipe.components.precision == "fp16"
    pipe.runners["fused_step"].activate()
    held = {id(p) for p in pipe.components.unet.parameters()}
    assert held <= {id(p) for p in pipe.runners["fused_step"].module.parameters()}
    image = pipe.run(photo, GenerationConfig(image_resolution=64, ddim_steps=1)).images[0]
    assert image.shape == (64, 128, 3)


def test_onnxruntime_with_cached_exports_never_loads_the_weights(tiny, photo, tmp_path):
    config = GenerationConfig(image_resolution=64, ddim_steps=2)
    options = dict(cache_dir=str(tmp_path))
    expected = ControlNetPipeline(tiny, "onnxruntime", **options).run(photo, config).images[0]  # exports
    load_preset("tiny", seed=0, cache_dir=tmp_path)
    lazy = load_preset("tiny", seed=0, cache_dir=tmp_path)
    image = ControlNetPipeline(lazy, "onnxruntime", **options).run(photo, config).images[0]
    assert not lazy.is_loaded() and np.array_equal(image, expected)


def test_single_file_pipeline_with_and_without_cache(tiny, ckpt, tmp_path, photo):
    config = GenerationConfig(image_resolution=64, ddim_steps=2)
    expected = ControlNetPipeline(tiny).run(photo, config).images[0]
    for cache in (False, True, True):
        pipe = ControlNetPipeline.from_single_file(ckpt, cache=cache, cache_dir=str(tmp_path))
        assert np.array_equal(pipe.run(photo, config).images[0], expected)


# ---------------------------------------------------------------------------------------------
# Files that are not checkpoints: one message naming the file and what it looks like
# ---------------------------------------------------------------------------------------------
def _legacy_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _zip_of(names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")
    return buffer.getvalue()


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content, looks_like", [
    (b"", "an empty file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
    (b"\xff\xd8\xff\xe0" + bytes(64), "a JPEG image"),
    (b"model:\n  target: cldm.cldm.ControlLDM\n", "a text file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 5710000000\n", "a Git LFS pointer file"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
    (_legacy_pickle(), "an old-style PyTorch pickle"),
    (_torch_zip()[:300], "a truncated or damaged zip archive"),
    (_zip_of(["readme.txt", "a.bin"]), "a zip archive that is not a PyTorch checkpoint"),
    (b"\xff\x00\x00\x00\x00\x00\x00\x00{\"a\":1}", "a truncated safetensors file"),
    (b"\x00\x01\x02garbage", "unrecognised binary data"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, looks_like):
    path = tmp_path / "control_sd15_canny.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"not a PyTorch checkpoint or safetensors file: {path} (looks like: {looks_like}")
    assert "expected a zip-format torch.save file (.pth/.ckpt) or a .safetensors file" in message
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint or safetensors file"):
        load_single_file(path, cache_dir=tmp_path / "cache")


def test_cli_names_the_bad_checkpoint(tmp_path, photo, capsys):
    import cv2

    from sdcn_trt.cli import main

    image = tmp_path / "cat.png"
    cv2.imwrite(str(image), photo)
    rc = main(["generate", str(image), "--checkpoint", str(image), "-o", str(tmp_path / "o"), "--ddim-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"not a PyTorch checkpoint or safetensors file: {image} (looks like: a PNG image)" in err


def test_streamed_safetensors_load_with_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {"b16": torch.arange(5, dtype=torch.float32), "a32": torch.randn(3, 7), "i": torch.arange(3),
               "empty": torch.zeros(0, 4), "view": torch.randn(4, 6)[:, :3]}
    dtypes = {"b16": torch.float16, "a32": torch.float32, "i": torch.int64, "empty": torch.float32,
              "view": torch.float32}
    write_safetensors(tmp_path / "x.safetensors", tensors, dtypes, {"key": "k"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.to(dtypes[name])), name
    header_len = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    assert (8 + header_len) % 64 == 0
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8: 8 + header_len])
    for name, info in header.items():  # every tensor starts at a multiple of its element size
        if name != "__metadata__":
            assert info["data_offsets"][0] % dtypes[name].itemsize == 0, name


def test_a_source_gone_after_loading_keys_the_tensors(tiny, tmp_path, caplog):
    path = tmp_path / "model.safetensors"
    save_single_file(tiny, path)
    loaded = load_single_file(path, cache=False)  # its key is the file's hash, read when first asked
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="sdcn_trt"):
        key = loaded.weights_id()
    assert "cannot key the weights by their source" in caplog.text
    assert key == Components(tiny.tokenizer, *tiny.modules().values()).weights_id()  # the tensors' hash
