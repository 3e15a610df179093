import gzip
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from sdcn_trt import WeightsError
from sdcn_trt.models.tokenizer import bundled_bpe_path, load_tokenizer, tokenize, write_clip_tokenizer_files


def _openai_simple_tokenizer():
    """openai-clip's own tokenizer module, loaded from its file (its package __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("clip")
    path = Path(spec.origin).parent / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(bundled_bpe_path()))


def test_vocabulary_sizes(tmp_path):
    folder = write_clip_tokenizer_files(tmp_path)
    assert len(json.loads((folder / "vocab.json").read_text())) == 49408
    assert len((folder / "merges.txt").read_text().splitlines()) == 1 + 48894
    assert gzip.open(bundled_bpe_path()).readline()  # the wheel's file is there


def test_tokenizes_like_openai_clip():
    tok = load_tokenizer()
    reference = _openai_simple_tokenizer()
    for text in ["a bird, best quality, extremely detailed", "longbody, lowres, bad anatomy, bad hands",
                 "A Cat's photo: 3 ÉLÉPHANTS!"]:
        ids = tokenize(tok, [text])[0].tolist()
        expected = [49406] + reference.encode(text) + [49407]
        assert ids[: len(expected)] == expected
        assert ids[len(expected):] == [49407] * (77 - len(expected))  # SD1.5 pads with the end token


def test_long_prompt_is_truncated_with_one_warning_of_ours(caplog):
    tok = load_tokenizer()
    transformers_logger = logging.getLogger("transformers")  # its own handler, propagate=False
    theirs: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = theirs.append
    old_level = transformers_logger.level
    transformers_logger.addHandler(handler)
    transformers_logger.setLevel(logging.WARNING)
    try:
        with caplog.at_level(logging.WARNING, logger="sdcn_trt.models.tokenizer"):
            ids = tokenize(tok, ["bird " * 100, "a short prompt"])
    finally:
        transformers_logger.removeHandler(handler)
        transformers_logger.setLevel(old_level)
    assert ids.shape == (2, 77) and ids[0, -1].item() == 49407
    ours = [r.getMessage() for r in caplog.records if r.name == "sdcn_trt.models.tokenizer"]
    assert len(ours) == 1 and ours[0].startswith("prompt has 102 tokens; CLIP reads 77, so the last 25 are dropped")
    assert [r.getMessage() for r in theirs] == []  # no "will result in indexing errors"


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(WeightsError, match="must hold vocab.json and merges.txt"):
        load_tokenizer(tmp_path)
