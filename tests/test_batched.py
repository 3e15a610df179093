"""Batched generation: many photos per network call give each photo its single-call image."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from sdcn_trt import ControlNetPipeline, GenerationConfig
from sdcn_trt.config import BackendConfig
from sdcn_trt.errors import InputError
from sdcn_trt.pipeline.batched import BatchItem, Prepared, broadcast, group_by_size, stack_text
from tests.conftest import pixel_diff


def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(getattr(skimage.data, name)(), size, interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def photos():
    """Four photos: three resize to 64x128 at resolution 64, one to 64x64 (a second size group);
    one gray and one RGBA (each converted as a single call converts it)."""
    cat = _photo("chelsea", (135, 90))
    rocket = _photo("rocket", (135, 90))
    gray = _photo("camera", (66, 66))  # 2-D uint8
    coffee = _photo("coffee", (135, 90))
    rgba = np.concatenate([coffee, np.full((*coffee.shape[:2], 1), 200, np.uint8)], axis=2)
    return [cat, gray, rocket, rgba]


def _items(photos):
    prompts = ["a cat", "a camera", "a rocket", "a cup"]
    return [BatchItem(p, prompt=t, seed=10 + i) for i, (p, t) in enumerate(zip(photos, prompts, strict=True))]


def _singles(pipe, items, config):
    return [pipe.run(i.image, config.replace(prompt=i.prompt, seed=i.seed)) for i in items]


def _assert_match(batched, singles, levels: int = 1, seeds: bool = True):
    assert len(batched) == len(singles)
    for b, s in zip(batched, singles, strict=True):
        assert b.seed == s.seed or not seeds  # a generator's seed is not known: a random one is reported
        np.testing.assert_array_equal(b.control, s.control)
        assert len(b.images) == len(s.images)
        for x, y in zip(b.images, s.images, strict=True):
            assert x.shape == y.shape
            assert pixel_diff(x, y).max() <= levels


@pytest.mark.parametrize("config", [
    GenerationConfig(image_resolution=64, ddim_steps=2),
    pytest.param(GenerationConfig(image_resolution=64, ddim_steps=2, num_samples=2, eta=0.5, guess_mode=True),
                 marks=pytest.mark.slow),
    pytest.param(GenerationConfig(image_resolution=64, ddim_steps=4, schedule="eps=2"), marks=pytest.mark.slow),
], ids=["plain", "samples-eta-guess", "eps-reuse"])
def test_torch_batch_matches_single_calls(tiny_pipe, photos, config):
    items = _items(photos)
    batched = tiny_pipe.run_batch(items, config)
    assert [out.batch for out in batched] == [3, 1, 3, 3]  # two size groups: 3 + 1
    _assert_match(batched, _singles(tiny_pipe, items, config))


def test_onnxruntime_batch_matches_single_calls(tiny, photos, fast_config):
    pytest.importorskip("onnxruntime")
    pipe = ControlNetPipeline(tiny, "onnxruntime")
    items = _items(photos)
    _assert_match(pipe.run_batch(items, fast_config, batch_size=2), _singles(pipe, items, fast_config))


def _per_photo(out, count: int, samples: int = 1) -> list:
    """A list call's one output as per-photo outputs (to compare with single calls)."""
    assert len(out.images) == count * samples and len(out.control) == len(out.seed) == count
    return [SimpleNamespace(images=out.images[i * samples : (i + 1) * samples], control=out.control[i],
                            seed=out.seed[i]) for i in range(count)]


def test_call_with_lists_broadcasts_single_values(tiny_pipe, photos, fast_config):
    """diffusers' convention: a list call returns one output whose .images holds every photo's images in
    input order, seeds and control maps as lists beside them."""
    cat, _, rocket, _ = photos
    out = tiny_pipe(["a cat", "a rocket"], [cat, rocket], num_inference_steps=2, image_resolution=64, seed=[3, 4],
                    negative_prompt="blurry", num_images_per_prompt=2)
    singles = [tiny_pipe(p, im, num_inference_steps=2, image_resolution=64, seed=s, negative_prompt="blurry",
                         num_images_per_prompt=2) for p, im, s in (("a cat", cat, 3), ("a rocket", rocket, 4))]
    assert out.seed == [3, 4] and out.batch == 2 and set(out.timings) >= {"denoise", "text"}
    _assert_match(_per_photo(out, 2, samples=2), singles)
    # one prompt for two photos, generators instead of seeds: each generator draws as in a single call
    out = tiny_pipe("a photo", [cat, rocket], num_inference_steps=2, image_resolution=64,
                    generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    singles = [tiny_pipe("a photo", im, num_inference_steps=2, image_resolution=64,
                         generator=torch.Generator().manual_seed(s)) for im, s in ((cat, 7), (rocket, 8))]
    _assert_match(_per_photo(out, 2), singles, seeds=False)


def test_batch_size_limits_calls_and_keeps_order(tiny_pipe, photos, fast_config):
    cat, _, rocket, rgba = photos
    items = [BatchItem(im, seed=s) for im, s in ((cat, 1), (rocket, 2), (rgba, 3))]
    outs = tiny_pipe.run_batch(items, fast_config, batch_size=2)
    assert [o.seed for o in outs] == [1, 2, 3]
    assert [o.batch for o in outs] == [2, 2, 1]
    _assert_match(outs, [tiny_pipe.run(i.image, fast_config.replace(seed=i.seed)) for i in items])


def test_prompts_of_a_batch_are_encoded_in_one_call(tiny, photos, fast_config):
    pipe = ControlNetPipeline(tiny, "torch")
    calls = []
    runner = pipe.runners["text_encoder"]
    original = runner.infer
    runner.infer = lambda feed: calls.append(tuple(feed["input_ids"].shape)) or original(feed)  # type: ignore[method-assign]
    pipe.run_batch([BatchItem(photos[0], prompt=p) for p in ("a", "b", "a", "c")], fast_config)
    assert calls == [(6, 77)]  # three new pairs, [negative, positive] each
    pipe.run_batch([BatchItem(photos[0], prompt=p) for p in ("a", "c", "d")], fast_config)
    assert calls == [(6, 77), (2, 77)]  # cached pairs are not encoded again


def test_out_of_memory_splits_the_batch(tiny, photos, caplog):
    fast_config = GenerationConfig(image_resolution=64, ddim_steps=1)
    pipe = ControlNetPipeline(tiny, "torch")
    step = pipe.runners["fused_step"]
    original = step.infer
    seen = []

    def infer(feed):
        seen.append(feed["latents"].shape[0])
        if feed["latents"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return original(feed)

    step.infer = infer  # type: ignore[method-assign]
    cat, _, rocket, rgba = photos
    items = [BatchItem(im, seed=s) for im, s in ((cat, 1), (rocket, 2), (rgba, 3))]
    with caplog.at_level(logging.WARNING, logger="sdcn_trt.pipeline.pipeline"):
        outs = pipe.run_batch(items, fast_config)
    assert [r.getMessage() for r in caplog.records] == [
        "a batch of 3 photos at 64x128 (x1 samples) does not fit in GPU memory; running calls of at most 2 at this size"]
    _assert_match(outs, [pipe.run(i.image, fast_config.replace(seed=i.seed)) for i in items])
    caplog.clear()
    seen.clear()
    pipe.run_batch(items[:2], fast_config)  # the size's limit is remembered: no new failures, no new log line
    assert max(seen) == 2 and not caplog.records


def test_a_single_photo_too_big_still_raises(tiny, photos, fast_config):
    pipe = ControlNetPipeline(tiny, "torch")

    def infer(feed):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    pipe.runners["fused_step"].infer = infer  # type: ignore[method-assign]
    with pytest.raises(torch.OutOfMemoryError):
        pipe.run_batch([photos[0]], fast_config)


def test_backend_max_batch_caps_calls(tiny, photos, fast_config):
    pipe = ControlNetPipeline(tiny, BackendConfig(max_batch=4))
    outs = pipe.run_batch([photos[0]] * 3, fast_config.replace(num_samples=2), batch_size=8)
    assert [o.batch for o in outs] == [2, 2, 1]  # 4 images per call: 2 photos x 2 samples
    assert BackendConfig(backend="tensorrt").batch_limit == 1  # engines built for the contest shape
    assert BackendConfig(backend="onnxruntime").batch_limit is None


def test_iter_batch_keeps_finished_calls_when_a_later_one_fails(tiny, photos, fast_config):
    pipe = ControlNetPipeline(tiny, "torch")
    cat, gray, _, _ = photos
    decoder = pipe.runners["vae_decoder"]
    original = decoder.infer

    def infer(feed):
        if feed["latents"].shape[-1] == feed["latents"].shape[-2]:  # the square photo's call
            raise RuntimeError("decoder failed (test)")
        return original(feed)

    decoder.infer = infer  # type: ignore[method-assign]
    done = []
    with pytest.raises(RuntimeError, match="decoder failed"):
        for index, out in pipe.iter_batch([cat, cat, gray], fast_config):
            done.append(index)
    assert done == [0, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=["a", "b"], image=["x", "y", "z"]), "one length .*prompt: 2, image: 3"),
    (dict(prompt=[], image="x"), "prompt is an empty list"),
    (dict(seed=[1, 2, 3], image=["x", "y"]), "seed: 3, image: 2"),
])
def test_broadcast_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        broadcast(**kwargs)


def test_broadcast_repeats_single_values():
    assert broadcast(prompt="p", seed=[1, 2]) == [{"prompt": "p", "seed": 1}, {"prompt": "p", "seed": 2}]
    assert broadcast(prompt="p") == [{"prompt": "p"}]


def test_bad_items_name_their_position(tiny_pipe, photos, fast_config):
    with pytest.raises(InputError, match="no items"):
        tiny_pipe.run_batch([], fast_config)
    with pytest.raises(InputError, match=r"batch item 1: .*dtype float32"):
        tiny_pipe.run_batch([photos[0], photos[0].astype(np.float32)], fast_config)
    with pytest.raises(InputError, match=r"batch item 0: seed must be -1 \(random\) or in"):
        tiny_pipe.run_batch([BatchItem(photos[0], seed=-5)], fast_config)
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        tiny_pipe.run_batch([photos[0]], fast_config, batch_size=0)
    with pytest.raises(InputError, match="one length"):
        tiny_pipe(["a", "b"], [photos[0]] * 3, num_inference_steps=2, image_resolution=64)
    with pytest.raises(InputError, match="max_batch must be an integer >= 1"):
        BackendConfig(max_batch=0)


def test_group_by_size_and_text_layout():
    def prep(index, h, w):
        return Prepared(index, np.zeros((h, w, 3), np.uint8), [], "p", "n", 0, torch.Generator(),
                        torch.Generator().get_state())

    items = [prep(0, 64, 64), prep(1, 64, 128), prep(2, 64, 64), prep(3, 64, 64)]
    assert [[i.index for i in call] for call in group_by_size(items, 2)] == [[0, 2], [3], [1]]
    assert [[i.index for i in call] for call in group_by_size(items, None)] == [[0, 2, 3], [1]]
    pairs = [torch.tensor([[[0.0]], [[1.0]]]), torch.tensor([[[2.0]], [[3.0]]])]  # (2, 1, 1) [negative, positive]
    assert stack_text(pairs, 2).flatten().tolist() == [0, 0, 2, 2, 1, 1, 3, 3]  # [negatives x S..., positives x S...]


def test_static_loop_batches_like_eager_single_calls(tiny, tiny_pipe, photos, fast_config):
    """cuda_graph='loop' on the CPU runs the static-buffer loop a GPU captures, keyed by (B, size)."""
    pipe = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop"))
    items = _items(photos)[:3:2]  # two photos of one size
    _assert_match(pipe.run_batch(items, fast_config), _singles(tiny_pipe, items, fast_config))
    assert [key.latent_shape[0] for key in pipe._loops] == [2]


@pytest.mark.slow
def test_inductor_text_encoder_compiles_for_a_batch_range(tiny, tmp_path):
    """max_batch > 1: built engines get batches 1..max_batch; the text encoder takes 2 rows per photo."""
    from sdcn_trt.engines import backend_available, create_runner
    from sdcn_trt.engines.torch import TorchRunner
    from sdcn_trt.export.descriptors import get_descriptor

    ok, why = backend_available("inductor", "cpu")
    if not ok:
        pytest.skip(why)
    desc = get_descriptor("text_encoder", tiny)
    runner = create_runner(desc, BackendConfig(backend="inductor", max_batch=3, cache_dir=str(tmp_path)))
    assert runner.settings.shape_range.max.batch == 3 and runner.settings.shape_range.min.batch == 1
    reference = TorchRunner(desc)
    for rows in (2, 4, 6):
        feed = {"input_ids": torch.randint(0, 100, (rows, 77), dtype=torch.int32)}
        assert (runner.infer(feed)["text_embeddings"] - reference.infer(feed)["text_embeddings"]).abs().max() < 1e-4
    with pytest.raises(InputError, match=r"'input_ids' has shape \(8, 77\); the profile allows \(2, 77\) .. \(6, 77\)"):
        runner.infer({"input_ids": torch.zeros((8, 77), dtype=torch.int32)})
