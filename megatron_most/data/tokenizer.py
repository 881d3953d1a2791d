"""Text tokenizers for the audio-text data: a sentencepiece model file or a Hugging Face directory.

`TextTokenizer.vocab_size` is the number of ids the model's text table must hold (every id
`encode` can return plus bos/eos); the model's `text_vocab_size` may be larger (DeepSeek-V2-Lite:
tokenizer 100015 ids, table 102400 rows) but never smaller.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import sentencepiece as spm
from transformers import AutoTokenizer

from megatron_most.options import ConfigError


class TextTokenizer:
    """Uniform view of a tokenizer: encode without special tokens, decode, bos/eos ids."""

    def __init__(
        self,
        *,
        name: str,
        vocab_size: int,
        bos: int,
        eos: int,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
    ):
        self.name = name
        self.vocab_size = vocab_size
        self.bos = bos
        self.eos = eos
        self._encode = encode
        self._decode = decode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no bos/eos added, and special-token strings in the text stay plain text."""
        return [int(i) for i in self._encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def __reduce__(self):
        # Worker processes get a fresh load from the path (the library objects sit in closures).
        return load_tokenizer, (self.name,)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos}, eos={self.eos})"


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load a sentencepiece `.model` file or a Hugging Face tokenizer directory."""
    path = Path(path)
    if path.is_file():
        return _sentencepiece(path)
    if path.is_dir():
        return _hugging_face(path)
    raise ConfigError(
        f"tokenizer={str(path)!r}: no such file or directory; pass a sentencepiece .model file "
        "or a Hugging Face tokenizer directory (with tokenizer.json or tokenizer_config.json)"
    )


def _sentencepiece(path: Path) -> TextTokenizer:
    model = spm.SentencePieceProcessor()
    try:
        model.load(str(path))
    except (OSError, RuntimeError) as err:
        raise ConfigError(
            f"tokenizer={str(path)!r}: not a sentencepiece model ({err}); pass a sentencepiece "
            ".model file or a Hugging Face tokenizer directory"
        ) from None
    bos, eos = model.bos_id(), model.eos_id()
    _require_special(path, bos=bos if bos >= 0 else None, eos=eos if eos >= 0 else None)
    return TextTokenizer(
        name=str(path),
        vocab_size=model.get_piece_size(),
        bos=bos,
        eos=eos,
        encode=lambda text: model.encode(text, out_type=int),
        decode=model.decode,
    )


def _hugging_face(path: Path) -> TextTokenizer:
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(
            f"tokenizer={str(path)!r}: directory has no tokenizer.json, tokenizer_config.json or "
            "tokenizer.model; pass a Hugging Face tokenizer directory or a sentencepiece .model file"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer={str(path)!r}: Hugging Face could not load it ({err})") from None
    _require_special(path, bos=tok.bos_token_id, eos=tok.eos_token_id)
    # len(tok) counts added tokens beyond tok.vocab_size (e.g. DeepSeek's bos 100000 / eos 100001).
    size = max(len(tok), tok.bos_token_id + 1, tok.eos_token_id + 1)
    return TextTokenizer(
        name=str(path),
        vocab_size=size,
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        # split_special_tokens: "<bos>" typed in data is text; only templates place specials.
        encode=lambda text: tok.encode(text, add_special_tokens=False, split_special_tokens=True),
        decode=lambda ids: tok.decode(ids),
    )


def _require_special(path: Path, *, bos: int | None, eos: int | None) -> None:
    missing = [name for name, value in (("bos", bos), ("eos", eos)) if value is None]
    if missing:
        raise ConfigError(
            f"tokenizer={str(path)!r}: no {' / '.join(missing)} token; the prompt templates need "
            "both (train sentencepiece with bos_id/eos_id >= 0, or set bos_token/eos_token in "
            "the Hugging Face tokenizer_config.json)"
        )
