"""The web page served on 127.0.0.1 (a free port), driven with gradio_client as a second program
would: a generation round trip, a queued second request, refused inputs, a cancelled request."""
from __future__ import annotations

import socket
import time

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'sdcn_trt[app]'")
client_lib = pytest.importorskip("gradio_client", reason="the live tests drive the page with gradio_client")

from tests.test_app import ARGS, count_steps  # noqa: E402

# the page's sliders refuse values outside the original ranges: resolution >= 256 (one image, 2 steps)
PAGE_ARGS = ARGS[:3] + (1, 256) + ARGS[5:]


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_pipe):
    from sdcn_trt.app import serve

    page = serve(tiny_pipe, port=free_port(), block=False, max_file_size="1mb")
    yield page
    page.close()


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory, photo):
    path = tmp_path_factory.mktemp("app") / "cat.png"
    PIL.Image.fromarray(photo).save(path)
    return path


def connect(page):
    return client_lib.Client(page.local_url, verbose=False)


def predict(client, image, *args, steps=None):
    args = list(args or PAGE_ARGS)
    if steps is not None:
        args[5] = steps
    upload = client_lib.handle_file(str(image)) if image is not None else None
    return client.submit(upload, *args, "torch", "fp32", "full", "ddim", api_name="/process")


def gallery_arrays(gallery) -> list[np.ndarray]:
    return [np.asarray(PIL.Image.open(item["image"])) for item in gallery]


def test_a_generation_round_trip(server, tiny_pipe, photo, photo_file):
    gallery, seed, timings, files = predict(connect(server), photo_file).result(timeout=120)
    expected = tiny_pipe.process(photo, *PAGE_ARGS)
    assert seed == 123 and "images/s" in timings and len(files) == 2
    for got, want in zip(gallery_arrays(gallery), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_second_visitor_waits_in_the_queue(server, tiny_pipe, photo, photo_file, monkeypatch):
    calls = count_steps(tiny_pipe, monkeypatch, delay=0.1)
    first, second = connect(server), connect(server)
    running = predict(first, photo_file, steps=10)
    wait_for(lambda: calls, "the first request's first step")
    waiting = predict(second, photo_file)
    seen = set()

    def note_status() -> bool:
        status = waiting.status()
        seen.add((status.code, status.rank))
        return waiting.done()

    wait_for(note_status, "the second request", timeout=120)
    assert (client_lib.utils.Status.IN_QUEUE, 0) in seen  # first in line behind the running request
    running.result(timeout=120)
    np.testing.assert_array_equal(gallery_arrays(waiting.result()[0])[1], tiny_pipe.process(photo, *PAGE_ARGS)[1])


def test_a_value_outside_the_original_range_is_refused(server, photo_file):
    args = list(PAGE_ARGS)
    args[3] = 13  # images: 1..12
    with pytest.raises(client_lib.exceptions.AppError, match="Value 13 is greater than maximum value 12"):
        predict(connect(server), photo_file, *args).result(timeout=60)


@pytest.mark.parametrize("content, message", [
    (None, "no image: upload a photo first"),
    (b"these are not pixels", "is not an image this page can read"),
])
def test_bad_input_is_refused_with_its_message(server, tmp_path, content, message):
    path = None
    if content is not None:
        path = tmp_path / "notes.png"
        path.write_bytes(content)
    with pytest.raises(client_lib.exceptions.AppError, match=message):
        predict(connect(server), path).result(timeout=60)


def test_an_upload_over_the_size_limit_is_refused(server, tmp_path):
    import httpx

    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * (2 * 1024 * 1024))  # 2 MB > the 1 MB limit
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):  # the client checks
        predict(connect(server), path).result(timeout=60)
    with path.open("rb") as data:  # and so does the server, for anything that does not
        response = httpx.post(server.local_url + "gradio_api/upload", files={"files": ("big.png", data)})
    assert response.status_code == 413 and "exceeded maximum allowed size of 1048576 bytes" in response.text


def test_a_cancelled_request_stops_early(server, tiny_pipe, photo_file, monkeypatch):
    calls = count_steps(tiny_pipe, monkeypatch, delay=0.05)
    job = predict(connect(server), photo_file, steps=40)
    wait_for(lambda: calls, "the first step")
    job.cancel()
    wait_for(lambda: not server.app_state.lock.locked(), "the generation to stop", timeout=30)
    assert 1 <= len(calls) < 40
