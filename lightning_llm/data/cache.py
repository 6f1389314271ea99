"""Fingerprints and the on-disk cache of prepared datasets and precomputed reference log-probs.

A prepared split is stored as Arrow files named by a fingerprint of everything its content depends on: the source
rows (``datasets``' own fingerprint of the source dataset), the tokenizer (its files' content, not the Python
object, which hashes differently in every process), the preparation settings and the version of the preparation
code. Any process that computes the same fingerprint loads the files instead of tokenizing again: the other ranks
of a run, and later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

#: environment variable naming the default cache directory
CACHE_ENV = "LIGHTNING_LLM_CACHE"


def default_cache_dir() -> Path:
    """``$LIGHTNING_LLM_CACHE``, else ``$XDG_CACHE_HOME/lightning_llm`` (``~/.cache/lightning_llm``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lightning_llm"


def fingerprint(*parts: Any) -> str:
    """A 16-hex-digit digest of ``parts`` (plain values: strings, numbers, lists, dicts; others by ``repr``)."""
    text = json.dumps(parts, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what the tokenizer would write with ``save_pretrained`` (vocabulary, merges, normaliser,
    special tokens, chat template, settings), equal across processes and runs for the same tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:  # a slow tokenizer: hash its saved files
        with tempfile.TemporaryDirectory() as directory:
            tokenizer.save_pretrained(directory)
            content = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                       for path in sorted(Path(directory).iterdir()) if path.is_file()}
    return fingerprint(type(tokenizer).__name__, content, _tokenizer_state(tokenizer))


def _tokenizer_state(tokenizer: PreTrainedTokenizerBase) -> str:
    """The settings of a tokenizer that change how text becomes ids, beyond its vocabulary and rules."""
    return fingerprint(
        tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None), tokenizer.pad_token_id,
        tokenizer.eos_token_id, tokenizer.bos_token_id, getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None), len(tokenizer),
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
