"""The text encoders' tokenizers, offline.

CLIP's byte-level BPE: the vocabulary is rebuilt from the BPE merge list that open_clip_torch ships inside its
wheel (`open_clip/bpe_simple_vocab_16e6.txt.gz`), exactly as OpenAI's CLIP vocabulary was made, so no
hub download is ever needed. T5's SentencePiece (Flux, SD3): no package ships it, so the user points to a
`tokenizer.json` (`use_t5_tokenizer`; ComfyUI has one at comfy/text_encoders/t5_tokenizer/). Inside a host,
the host's own tokenizer is used instead.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import EraserError, InvalidParameterError
from .models.arch import CLIP_WINDOW

BOS_ID = 49406
EOS_ID = 49407


def _bpe_merges_path() -> Path:
    # find_spec locates the package without importing it (open_clip imports torchvision on import).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise EraserError(
            "the CLIP vocabulary is missing: install open_clip_torch (pip install --no-deps open_clip_torch), "
            "whose wheel ships bpe_simple_vocab_16e6.txt.gz"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise EraserError(f"{path} is missing from the open_clip_torch installation")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


# A host that ships CLIP's vocabulary files (ComfyUI: comfy/sd1_tokenizer/) sets them with
# `use_vocabulary_files`, so inside it nothing else is needed and its own vocabulary is the one used.
_VOCABULARY_FILES: tuple[Path, Path] | None = None


def use_vocabulary_files(vocab_json: str | Path, merges_txt: str | Path) -> None:
    """Tokenize with these CLIP vocabulary files (vocab.json, merges.txt) instead of open_clip's merge list."""
    global _VOCABULARY_FILES
    files = (Path(vocab_json), Path(merges_txt))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise EraserError(f"CLIP vocabulary file not found: {missing[0]}")
    _VOCABULARY_FILES = files
    clip_vocabulary.cache_clear()
    clip_tokenizer.cache_clear()


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, merges) of CLIP's BPE: the host's files (`use_vocabulary_files`), or rebuilt from the
    merge list open_clip ships."""
    if _VOCABULARY_FILES is not None:
        vocab = json.loads(_VOCABULARY_FILES[0].read_text(encoding="utf-8"))
        lines = _VOCABULARY_FILES[1].read_text(encoding="utf-8").split("\n")
        merges = [line for line in lines if line and not line.startswith("#version")]
    else:
        merges = gzip.open(_bpe_merges_path()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        symbols = list(_bytes_to_unicode().values())
        vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
        vocab_list += ["<|startoftext|>", "<|endoftext|>"]
        vocab = {t: i for i, t in enumerate(vocab_list)}
    return vocab, [tuple(m.split(" ")) for m in merges]


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """CLIP's byte-level BPE as a `tokenizers.Tokenizer`, set up as transformers' `CLIPTokenizer` sets up
    its backend (NFC, whitespace runs to one space, lower case, CLIP's split pattern, byte level, BPE
    with `</w>` word ends, BOS/EOS as special tokens). Built directly: importing transformers' tokenizer
    classes costs seconds."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = clip_vocabulary()
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    split = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="removed",
                                                                            invert=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # as transformers: matched whole in text
    return tokenizer


@dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...]  # always the window long: BOS, words, EOS, padding (T5: no BOS)
    length: int  # BOS + words + EOS (T5: words + EOS)
    truncated: bool


def tokenize(text: str, pad_id: int, window: int = CLIP_WINDOW) -> Tokens:
    """Tokenize like the hosts: BOS, at most window − 2 tokens, EOS, padding to `window` with `pad_id`.

    Longer prompts are truncated with a warning (hosts split them into several window-long chunks;
    an erasure target is one chunk)."""
    words = clip_tokenizer().encode(text, add_special_tokens=False).ids
    truncated = len(words) > window - 2
    if truncated:
        warnings.warn(
            f"prompt {text[:40]!r}... has {len(words)} tokens; only the first {window - 2} are used", stacklevel=2
        )
        words = words[: window - 2]
    ids = [BOS_ID, *words, EOS_ID]
    length = len(ids)
    ids += [pad_id] * (window - length)
    return Tokens(tuple(ids), length, truncated)


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (ToyWorld's, carried in its checkpoint's metadata).

    Ids 0, 1, 2 are BOS, EOS and unknown; words follow in vocabulary order. A prompt becomes BOS,
    its words, EOS, then EOS padding up to `window`, as SD1's CLIP-L pads."""

    SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")

    def __init__(self, words: Sequence[str], window: int):
        self.vocab = self.SPECIAL + tuple(w for w in words if w not in self.SPECIAL)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.window = window
        self._unknown_warned: set[str] = set()

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case words; punctuation other than hyphens separates words."""
        return re.findall(r"[a-z0-9][a-z0-9\-]*", text.lower())

    def __call__(self, text: str) -> Tokens:
        words = [self.index.get(w, 2) for w in self.split(text)]
        unknown = [w for w in self.split(text) if w not in self.index]
        if unknown and text not in self._unknown_warned:  # once per prompt: erasure encodes each prompt repeatedly
            self._unknown_warned.add(text)
            warnings.warn(f"prompt {text[:40]!r}: {', '.join(unknown)} not in the model's vocabulary of "
                          f"{len(self.vocab) - len(self.SPECIAL)} words (e.g. {', '.join(self.vocab[3:8])}); unknown "
                          "words all read as one <|unk|> token", stacklevel=2)
        truncated = len(words) > self.window - 2
        if truncated:
            warnings.warn(f"prompt {text[:40]!r}... is longer than {self.window - 2} words; the rest is dropped",
                          stacklevel=2)
            words = words[: self.window - 2]
        ids = [0, *words, 1]
        return Tokens(tuple(ids + [1] * (self.window - len(ids))), len(ids), truncated)


_T5_TOKENIZER_FILE: Path | None = None
T5_TOKENIZER_HINT = ("give T5's tokenizer.json (command line: --t5-tokenizer; ComfyUI ships one at "
                     "comfy/text_encoders/t5_tokenizer/tokenizer.json, the T5 v1.1 / google/t5-v1_1-xxl one)")


def use_t5_tokenizer(path: str | Path, field: str = "t5_tokenizer") -> None:
    """Tokenize T5 prompts with this `tokenizer.json` (a `tokenizers` file of T5's SentencePiece vocabulary)."""
    global _T5_TOKENIZER_FILE
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(field, f"{path} is not a file; {T5_TOKENIZER_HINT}")
    t5_tokenizer.cache_clear()
    previous, _T5_TOKENIZER_FILE = _T5_TOKENIZER_FILE, path
    try:
        t5_tokenizer()
    except EraserError as exc:
        _T5_TOKENIZER_FILE = previous
        raise InvalidParameterError(field, str(exc)) from None


@functools.lru_cache(maxsize=1)
def t5_tokenizer():
    """The `tokenizers.Tokenizer` of the file given to `use_t5_tokenizer`, checked to be T5's (</s> is id 1,
    <pad> id 0)."""
    from tokenizers import Tokenizer

    if _T5_TOKENIZER_FILE is None:
        raise EraserError(f"T5's tokenizer is needed for this model: {T5_TOKENIZER_HINT}")
    try:
        tokenizer = Tokenizer.from_file(str(_T5_TOKENIZER_FILE))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
        raise EraserError(f"{_T5_TOKENIZER_FILE} is not a tokenizer.json that `tokenizers` reads: {exc}") from None
    if tokenizer.token_to_id("</s>") != T5_EOS_ID or tokenizer.token_to_id("<pad>") != T5_PAD_ID:
        raise EraserError(f"{_T5_TOKENIZER_FILE} is not T5's tokenizer (its </s> and <pad> are not ids 1 and 0)")
    return tokenizer


T5_EOS_ID, T5_PAD_ID = 1, 0


def tokenize_t5(text: str, window: int) -> Tokens:
    """As ComfyUI tokenizes for T5 (comfy/sd1_clip.py SDTokenizer with T5's settings): the text's pieces, EOS,
    zero padding to `window` (its min_length: 256 for Flux, 77 for SD3); no BOS. Longer prompts are truncated
    with a warning (ComfyUI lengthens the window instead)."""
    words = t5_tokenizer().encode(text, add_special_tokens=False).ids
    truncated = len(words) > window - 1
    if truncated:
        warnings.warn(f"prompt {text[:40]!r}... has {len(words)} T5 tokens; only the first {window - 1} are used",
                      stacklevel=2)
        words = words[: window - 1]
    ids = [*words, T5_EOS_ID]
    return Tokens(tuple(ids + [T5_PAD_ID] * (window - len(ids))), len(ids), truncated)


def tokenizer_for(spec) -> Callable[[str], Tokens]:
    """text → Tokens for one text encoder (an `EncoderSpec`): CLIP's BPE padded as the encoder
    pads, the word-level vocabulary the checkpoint carries (`spec.tokenizer == "word"`), or T5's."""
    if spec.tokenizer == "word":
        return WordTokenizer(spec.vocab, spec.window)
    if spec.tokenizer == "t5":
        return lambda text: tokenize_t5(text, spec.window)
    pad = EOS_ID if spec.pad_token == "eos" else 0
    return lambda text: tokenize(text, pad, spec.window)
