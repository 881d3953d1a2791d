"""Text normalisers applied before scoring: Whisper's English normaliser, a basic one for other
languages, and the answer normaliser of spoken QA.

The English normaliser is the one of OpenAI Whisper as transformers ships it
(`transformers.models.whisper.english_normalizer.EnglishTextNormalizer`). Its British -> American
spelling table (`english.json`, 1739 entries) is not in transformers (it comes with a Whisper
tokenizer download); the `whisper-normalizer` package ships the same file byte for byte, so it is
read from there and no download is needed. Only that data file is used, never that package's code.
"""

from __future__ import annotations

import functools
import json
import os
import re
from importlib import resources
from typing import Callable

from megatron_most.options import ConfigError

LANGUAGES_WITH_ENGLISH_RULES = ("en",)
ARTICLES = re.compile(r"\b(a|an|the)\b")


def english_spelling_mapping(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Whisper's British -> American spelling table: from `path` (a Whisper tokenizer's
    `normalizer.json` or OpenAI's `english.json`) or, by default, the copy in `whisper-normalizer`."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    try:
        data = resources.files("whisper_normalizer").joinpath("normalizers/english.json")
        return json.loads(data.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ConfigError(
            "the English spelling table of the Whisper normaliser was not found: `pip install "
            "whisper-normalizer` (it ships english.json) or pass the path of a Whisper tokenizer's normalizer.json"
        ) from e


@functools.lru_cache(maxsize=4)
def english_normalizer(mapping_path: str | None = None) -> Callable[[str], str]:
    """Whisper's English text normaliser (numbers, currencies, titles, contractions, spellings,
    fillers, punctuation). Cached: building it compiles a few hundred patterns."""
    # Imported here: transformers' package import costs seconds, and only scoring needs it.
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    normalizer = EnglishTextNormalizer(english_spelling_mapping(mapping_path))
    return lambda text: " ".join(normalizer(text).split())


@functools.lru_cache(maxsize=1)
def basic_normalizer() -> Callable[[str], str]:
    """Whisper's language-independent normaliser: lower case, bracketed spans dropped, symbols and
    punctuation to spaces, whitespace collapsed (diacritics kept)."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    normalizer = BasicTextNormalizer(remove_diacritics=False)
    return lambda text: " ".join(normalizer(text).split())


def text_normalizer(language: str | None) -> Callable[[str], str]:
    """The normaliser for `language`: English rules for "en", the basic one for any other language
    code, and whitespace collapsing only for None (scoring raw text, stated in the results)."""
    if language is None:
        return lambda text: " ".join(text.split())
    if not isinstance(language, str) or not language:
        raise ConfigError(f"language={language!r}: pass an ISO code such as 'en', or None for raw text")
    return english_normalizer() if language.lower() in LANGUAGES_WITH_ENGLISH_RULES else basic_normalizer()


def normalizer_name(language: str | None) -> str:
    """How `text_normalizer(language)` normalises, for the results file."""
    if language is None:
        return "none (whitespace collapsed)"
    return "whisper-english" if language.lower() in LANGUAGES_WITH_ENGLISH_RULES else "whisper-basic"


def normalize_answer(text: str) -> str:
    """QA answer normaliser: Whisper's English normaliser (so "twenty five" and "25", "colour" and
    "color" agree, which matters for transcribed speech answers), then the articles a/an/the removed
    as in SQuAD-style answer matching."""
    return " ".join(ARTICLES.sub(" ", english_normalizer()(text)).split())
