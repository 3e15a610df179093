"""The web page (sdcn_trt.app) in-process: wiring, the callback against process(), every refused input,
cancellation at a step boundary, build notes, launch options and the `app` sub-command."""
from __future__ import annotations

import asyncio
import io
import logging
import struct
import sys
import threading
import time
import zlib

import numpy as np
import PIL.Image
import pytest

gr = pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'sdcn_trt[app]'")

from sdcn_trt import GenerationConfig  # noqa: E402
from sdcn_trt.app import (  # noqa: E402
    AppState, BuildNotes, GenerationCancelled, build_app, launch_options, make_callback, photo_input,
)
from sdcn_trt.errors import SdcnError  # noqa: E402

# the original page's sliders: label -> (minimum, maximum, default, step); the seed: see below
ORIGINAL_SLIDERS = {
    "Images": (1, 12, 1, 1), "Image Resolution": (256, 768, 512, 64), "Control Strength": (0.0, 2.0, 1.0, 0.01),
    "Canny low threshold": (1, 255, 100, 1), "Canny high threshold": (1, 255, 200, 1), "Steps": (1, 100, 20, 1),
    "Guidance Scale": (0.1, 30.0, 9.0, 0.1),
}
INPUT_LABELS = ["Image", "Prompt", "Added Prompt", "Negative Prompt", "Images", "Image Resolution", "Steps",
                "Guess Mode", "Control Strength", "Guidance Scale", "Seed (-1: random)", "eta (DDIM)",
                "Canny low threshold", "Canny high threshold", "Backend", "Precision", "Schedule", "Sampler"]
# the original process() arguments after the image: prompt .. high_threshold (resolution 64, 2 steps: fast)
ARGS = ("a cat", "best quality", "lowres", 2, 64, 2, False, 1.0, 9.0, 123, 0.0, 100, 200)


@pytest.fixture(scope="module")
def page(tiny_pipe):
    return build_app(tiny_pipe)


@pytest.fixture
def state(tiny_pipe):
    return AppState(tiny_pipe)


def call(state, image, *args, backend="torch", precision="fp32", schedule="full", sampler="ddim"):
    return asyncio.run(make_callback(state)(image, *args, backend, precision, schedule, sampler))


def test_the_page_has_the_original_controls_in_process_order(page):
    run = next(d for d in page.fns.values() if d.api_name == "process")
    assert [block.label for block in run.inputs] == INPUT_LABELS
    assert run.concurrency_limit == 1
    sliders = {b.label: (b.minimum, b.maximum, b.value, b.step) for b in page.blocks.values()
               if isinstance(b, gr.Slider) and b.label in ORIGINAL_SLIDERS}
    assert sliders == ORIGINAL_SLIDERS
    seed = next(b for b in page.blocks.values() if isinstance(b, gr.Slider) and b.label.startswith("Seed"))
    assert (seed.minimum, seed.maximum, seed.value) == (-1, 2147483647, -1)  # -1: a random seed per run, shown
    gallery = next(b for b in page.blocks.values() if isinstance(b, gr.Gallery))
    assert gallery.format == "png"  # lossless: the downloaded images are the generated ones
    stop = next(d for d in page.fns.values() if d.fn is None and d.cancels)
    assert stop.cancels == [run._id]


def test_the_callback_returns_what_process_returns(tiny_pipe, state, photo):
    gallery, seed, timings, files = call(state, photo, *ARGS)
    expected = tiny_pipe.process(photo, *ARGS)
    assert len(gallery) == 1 + 2 and seed == 123
    for got, want in zip(gallery, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for path, want in zip(files, expected, strict=True):  # the PNG downloads are the same pixels
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(path)), want)
    for stage in ("text encoder", "denoising", "VAE decode", "total (wall clock)", "images/s", "torch fp32 on cpu"):
        assert stage in timings


def test_seed_minus_one_draws_one_and_shows_it(tiny_pipe, state, photo):
    args = list(ARGS)
    args[9] = -1
    gallery, seed, _, _ = call(state, photo, *args)
    assert 0 <= seed <= 65535
    args[9] = seed
    np.testing.assert_array_equal(gallery[1], tiny_pipe.process(photo, *args)[1])


def test_the_sampler_dropdown_runs_that_sampler(tiny_pipe, state, photo):
    gallery, _, timings, _ = call(state, photo, *ARGS, sampler="dpmpp_2m")
    assert "sampler dpmpp_2m" in timings
    config = GenerationConfig(*ARGS, sampler="dpmpp_2m")
    np.testing.assert_array_equal(gallery[1], tiny_pipe.run(photo, config).images[0])


def test_another_backend_and_schedule_run_on_the_same_weights(tiny_pipe, state, photo):
    gallery, _, timings, _ = call(state, photo, *ARGS, precision="fp16", schedule="steps=1")
    assert "torch fp16 on cpu, schedule steps=1" in timings
    assert [g.shape for g in gallery] == [(64, 128, 3)] * 3  # the 90x135 photo at resolution 64
    assert state.pipelines[("torch", "fp16")].components is tiny_pipe.components


@pytest.mark.parametrize("change, message", [
    ({"image": None}, "no image: upload a photo first"),
    ({"image": np.zeros((32, 1200, 3), np.uint8)}, "resizes to 64x2432: its long side exceeds max_side=2048"),
    ({"low": 250}, r"low_threshold \(250\) must not exceed high_threshold \(200\)"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"backend": "tensorrt"}, "backend 'tensorrt' is unavailable here"),
    ({"backend": "nope"}, "unknown backend 'nope'"),
    ({"schedule": "eps=99"}, "eps"),
    ({"sampler": "heun"}, "unknown sampler 'heun'; choose one of ddim"),
    ({"sampler": "unipc", "eta": 0.5}, "sampler unipc has none"),
])
def test_bad_inputs_are_messages_in_the_page(state, photo, change, message):
    args = list(ARGS)
    args[5] = change.get("steps", args[5])
    args[10] = change.get("eta", args[10])
    args[11] = change.get("low", args[11])
    image = change.get("image", photo)
    with pytest.raises(gr.Error, match=message):
        call(state, image, *args, backend=change.get("backend", "torch"), schedule=change.get("schedule", "full"),
             sampler=change.get("sampler", "ddim"))


def test_an_internal_error_is_logged_and_shown_without_a_traceback(state, photo, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(state, "generate", broken)
    with caplog.at_level(logging.ERROR, logger="sdcn_trt.app"), pytest.raises(gr.Error) as info:
        call(state, photo, *ARGS)
    assert "internal error" in info.value.message and "secret" not in info.value.message
    assert "secret internals" in caplog.text  # the server's log has it


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (nothing behind it: PIL reads the header only)."""
    buffer = io.BytesIO()
    PIL.Image.new("1", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


@pytest.mark.parametrize("content, message", [
    (b"these are not pixels", "notes.png is not an image this page can read"),
    (_png_header(10000, 8000), "notes.png is 10000x8000 pixels; at most 50 megapixels"),
])
def test_uploads_that_are_not_usable_images_are_refused(tmp_path, content, message):
    from gradio.data_classes import ImageData

    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(gr.Error, match=message):
        photo_input(type="numpy").preprocess(ImageData(path=str(path), orig_name="notes.png"))


def test_an_uploaded_photo_decodes_to_rgb(tmp_path, photo):
    from gradio.data_classes import ImageData

    path = tmp_path / "cat.png"
    PIL.Image.fromarray(photo).save(path)
    np.testing.assert_array_equal(photo_input(type="numpy").preprocess(ImageData(path=str(path))), photo)


def count_steps(pipe, monkeypatch, delay: float = 0.0) -> list[int]:
    """Wrap the fused step's runner: the list grows by one per denoising step (after `delay` s)."""
    runner = pipe.runner("fused_step")
    calls: list[int] = []
    infer = runner.infer

    def counted(feed):
        time.sleep(delay)
        calls.append(1)
        return infer(feed)

    monkeypatch.setattr(runner, "infer", counted)
    return calls


def test_cancel_stops_at_the_next_step_boundary(tiny_pipe, state, photo, monkeypatch):
    calls = count_steps(tiny_pipe, monkeypatch)
    cancel, seen = threading.Event(), []

    def progress(done, total):
        seen.append((done, total))
        if done == 2:
            cancel.set()  # as the Stop button does, during step 2

    config = GenerationConfig(image_resolution=64, ddim_steps=10)
    with pytest.raises(GenerationCancelled, match="stopped after step 2 of 10"):
        state.generate(photo, config, "torch", "fp32", progress, lambda text: None, cancel)
    assert seen == [(1, 10), (2, 10)] and len(calls) == 2  # steps 3..10 never ran
    assert not state.lock.locked()


def test_a_cancelled_request_frees_the_device_early(tiny_pipe, state, photo, monkeypatch):
    calls = count_steps(tiny_pipe, monkeypatch, delay=0.05)
    args = list(ARGS)
    args[5] = 40  # steps

    async def cancel_after_a_step():
        task = asyncio.ensure_future(make_callback(state)(photo, *args, "torch", "fp32", "full"))
        while not calls:
            await asyncio.sleep(0.01)
        task.cancel()  # what Gradio does on Stop or when the visitor leaves
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_a_step())
    assert state.lock.acquire(timeout=10)
    state.lock.release()
    assert 1 <= len(calls) < 40


def test_build_notes_forward_the_package_log_of_their_own_thread():
    shown: list[str] = []
    other = threading.Thread(target=lambda: logging.getLogger("sdcn_trt.engines.x").info("not this one"))
    with BuildNotes(shown.append):
        logging.getLogger("sdcn_trt.engines.inductor").info("compiling %s", "fused_step")
        other.start()
        other.join()
    logging.getLogger("sdcn_trt.engines.inductor").info("after")
    assert shown == ["compiling fused_step"]


def test_a_compiled_backends_first_run_says_so(tiny_pipe, state, photo, monkeypatch):
    notes: list[str] = []
    pipe = state.pipeline("onnxruntime", "fp32")

    def fake_run(image, config, progress):  # stands in for the exports: the notes, not their minutes
        logging.getLogger("sdcn_trt.export.onnx_export").info("exported fused_step (fp32) in 1.0 s")
        return tiny_pipe.run(image, config, progress=progress)

    monkeypatch.setattr(pipe, "run", fake_run)
    state.generate(photo, GenerationConfig(image_resolution=64, ddim_steps=2), "onnxruntime", "fp32",
                   lambda d, t: None, notes.append, threading.Event())
    assert notes == ["first onnxruntime run: exporting / building its networks (can take minutes)",
                     "exported fused_step (fp32) in 1.0 s"]


def test_unavailable_backends_are_listed_with_the_reason(state):
    choices, notes = state.backend_choices()
    assert ("torch", "torch") in choices and ("tensorrt (unavailable)", "tensorrt") in choices
    assert any(n.startswith("**tensorrt** is unavailable here: ") for n in notes)


def test_launch_options_are_safe_by_default_and_warn_otherwise(caplog):
    with caplog.at_level(logging.WARNING, logger="sdcn_trt.app"):
        options = launch_options()
    assert options["server_name"] == "127.0.0.1" and options["share"] is False and not caplog.records
    assert options["max_file_size"] == "20mb" and options["show_error"] is False
    with caplog.at_level(logging.WARNING, logger="sdcn_trt.app"):
        launch_options(host="0.0.0.0", share=True)
    assert "listening on 0.0.0.0" in caplog.text and "public link" in caplog.text


def test_the_app_command_serves_the_chosen_model(monkeypatch):
    import sdcn_trt.app
    from sdcn_trt import cli

    served, loaded = {}, []
    monkeypatch.setattr(cli, "load_pipeline", lambda args: loaded.append(args.preset) or "pipe")
    monkeypatch.setattr(sdcn_trt.app, "serve", lambda pipe, **kw: served.update(kw, pipe=pipe))
    assert cli.main(["app", "--port", "7999"]) == 0
    assert loaded == ["tiny-trained"]  # the default model
    assert served == {"pipe": "pipe", "host": "127.0.0.1", "port": 7999, "share": False, "max_file_size": "20mb"}
    assert cli.main(["app", "--preset", "tiny", "--host", "0.0.0.0", "--share"]) == 0
    assert loaded[-1] == "tiny" and served["host"] == "0.0.0.0" and served["share"] is True


def test_without_gradio_the_app_says_how_to_install_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "sdcn_trt.app")
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(SdcnError, match=r"pip install 'sdcn_trt\[app\]'"):
        import sdcn_trt.app  # noqa: F401
