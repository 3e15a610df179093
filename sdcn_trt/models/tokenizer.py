"""The standard CLIP BPE tokenizer, built offline from the vocabulary inside the openai-clip wheel."""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path

from sdcn_trt.cache import cache_root
from sdcn_trt.errors import WeightsError

logger = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def bundled_bpe_path() -> Path:
    """Path of the BPE merges file shipped in the openai-clip (or open-clip-torch) wheel."""
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)  # locating the package does not import it
        if spec is not None and spec.origin is not None:
            candidate = Path(spec.origin).parent / BPE_FILE
            if candidate.is_file():
                return candidate
    raise WeightsError(
        f"no CLIP vocabulary found: {BPE_FILE} ships in the 'openai-clip' package "
        "(pip install openai-clip), or pass tokenizer=<folder with vocab.json and merges.txt>"
    )


def write_clip_tokenizer_files(folder: Path, bpe_path: Path | None = None) -> Path:
    """Convert the BPE file into transformers' CLIPTokenizer files (vocab.json, merges.txt, config)."""
    bpe_path = bpe_path or bundled_bpe_path()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",  # SD1.5's tokenizer pads with the end token
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    return folder


def load_tokenizer(path: str | Path | None = None, cache_dir: Path | None = None):  # -> CLIPTokenizer
    """A CLIPTokenizer from `path`, or the standard SD1.5 one built from the bundled vocabulary."""
    from transformers import CLIPTokenizer

    if path is None:
        folder = (cache_dir or cache_root()) / "clip_tokenizer"
        if not (folder / "merges.txt").is_file():
            write_clip_tokenizer_files(folder)
        path = folder
    path = Path(path)
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not has_bpe and not (path / "tokenizer.json").is_file():
        raise WeightsError(f"tokenizer folder {path} must hold vocab.json and merges.txt (or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad ids for a CLIPTextConfig, from the tokenizer that feeds it (49406/49407 for SD1.5)."""
    return {"bos_token_id": int(tokenizer.bos_token_id), "eos_token_id": int(tokenizer.eos_token_id),
            "pad_token_id": int(tokenizer.pad_token_id)}


def tokenize(tokenizer, prompts: list[str]):  # -> torch.LongTensor (len(prompts), 77)
    """Token ids padded to 77 as the reference's FrozenCLIPEmbedder does; longer prompts are cut
    at 77 tokens with a warning saying how many were dropped."""
    max_length = tokenizer.model_max_length
    for prompt in prompts:
        # verbose=False: counting the full length is on purpose; transformers would otherwise log
        # that the sequence "will result in indexing errors", which the truncation below prevents
        n = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
        if n > max_length:
            logger.warning(
                "prompt has %d tokens; CLIP reads %d, so the last %d are dropped: %.60r...",
                n, max_length, n - max_length, prompt,
            )
    batch = tokenizer(prompts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return batch.input_ids
