"""The CLIP tokenizer: byte-level BPE over `vocab.json` + `merges.txt`, ids padded to 77.

The text goes through these steps (they give the same ids as transformers' CLIPTokenizer):

1. Special tokens (BOS, EOS and the pad token) written literally in the prompt are cut out first,
   matched case-sensitively on the raw text. With SD2's pad token "!" every "!" becomes id 0.
2. Each remaining segment is normalised: Unicode NFC, then lower-case, one character at a time
   (so no Greek final sigma). Python's Unicode tables decide both; Python 3.11 (Unicode 14) lacks
   the 55 capitals Unicode 16 added, which transformers' Rust tables lower-case. Whitespace is not collapsed or stripped here: step 3 drops it anyway.
   No html-unescaping and no ftfy, unlike OpenAI's original tokenizer.
3. The CLIP regex cuts the segment into words: runs of letters, single digits, runs of other
   non-space characters, and the English contractions 's 't 're 've 'm 'll 'd.
4. A word's UTF-8 bytes are spelled with 256 printable stand-in characters, "</w>" marks its last
   symbol, and BPE merges adjacent pairs, lowest merge rank first, until none applies.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
import os
import re
import unicodedata
from pathlib import Path

import regex
import torch

from ..checkpoints.io import atomic_write
from ..errors import CheckpointError, InvalidInputError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
WORD_END = "</w>"
_MERGES_HEADER = "#version: 0.2"
_DEFAULT_MERGES = 49152 - 256 - 2  # 48,894 merges: CLIP's vocabulary holds 49,408 entries

# No IGNORECASE flag although CLIP's original has one: the text is already lower-case, and the flag
# would make [\p{L}] also match U+0345, which transformers does not.
_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# transformers splits a special-token literal that appears only after lower-casing ("<|ENDOFTEXT|>")
# again with GPT-2's regex, into these three pieces.
_SPECIAL_PIECES = regex.compile(r"<\||\|>|[^<|>]+")


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's printable stand-in character for each byte value: printable Latin-1 bytes map to
    themselves, the other 68 to chr(256), chr(257), ... in byte order. Keyed by int, it doubles as
    a str.translate table for text decoded as latin-1 (one character per byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table  # in CLIP's vocabulary order: printable bytes first


@functools.lru_cache(maxsize=1)
def _default_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges, built from the BPE file that ships with sdtorch (as open_clip does)."""
    asset = importlib.resources.files("sdtorch") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(asset.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(_parse_merge(line) for line in lines[1 : _DEFAULT_MERGES + 1])  # line 0 is a header
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + WORD_END for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _read_files(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json and merges.txt (an optional `#version` header line is skipped)."""
    vocab = _read_json(vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise CheckpointError(f"could not read merges file {merges_path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"merges file {merges_path} is not UTF-8 text ({e})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return vocab, [_parse_merge(line) for line in lines if line.strip("\r")]


def _parse_merge(line: str) -> tuple[str, str]:
    pair = line.rstrip("\r").split(" ")
    if len(pair) != 2:
        raise CheckpointError(f"merges: line {line!r} is not two symbols separated by one space")
    return pair[0], pair[1]


def _special_token(value) -> str | None:
    """A token as tokenizer configs write it: a string or {"content": string, ...}."""
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer; gives the ids transformers' `CLIPTokenizer` gives.

    Args:
        vocab: token -> id; must hold the BOS, EOS and pad tokens.
        merges: BPE merges, highest priority first.
        pad_token: "<|endoftext|>" for SD1 (id 49407), "!" for SD2 / OpenCLIP (id 0).
        max_length: length of the padded rows `__call__` returns, BOS and EOS included.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]] | tuple[tuple[str, str], ...],
        pad_token: str = EOS_TOKEN,
        max_length: int = CONTEXT_LENGTH,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
    ):
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token not in vocab:
                raise InvalidInputError(f"{name} {token!r} is not in the vocabulary")
        if max_length < 2:
            raise InvalidInputError(f"max_length must leave room for BOS and EOS (>= 2), got {max_length}")
        self._vocab = vocab
        self._merges = tuple(merges)
        self._ranks = {pair: rank for rank, pair in enumerate(self._merges)}
        self._bos, self._eos, self._pad = bos_token, eos_token, pad_token
        self._max_length = max_length
        specials = sorted({bos_token, eos_token, pad_token}, key=len, reverse=True)  # longest match wins
        self._specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        self._word_ids = functools.lru_cache(maxsize=65536)(self._bpe)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def default(cls, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """The standard CLIP vocabulary (49,408 tokens), built from the shipped BPE file."""
        vocab, merges = _default_vocab()
        return cls(vocab, merges, pad_token=pad_token)

    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        pad_token: str = EOS_TOKEN,
        max_length: int = CONTEXT_LENGTH,
    ) -> CLIPTokenizer:
        """Load `vocab.json` and `merges.txt` (an optional `#version` header line is skipped)."""
        vocab, merges = _read_files(Path(vocab_path), Path(merges_path))
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPTokenizer:
        """Load a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt`, or a `tokenizer.json`
        (what transformers 5 writes). The special tokens and `model_max_length` come from
        `tokenizer_config.json`, overridden by `special_tokens_map.json`, where present."""
        folder = Path(folder)
        settings: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(_read_json(folder / name))
        tokens = {
            key: _special_token(settings.get(f"{key}_token")) or default
            for key, default in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", EOS_TOKEN))
        }
        max_length = settings.get("model_max_length")
        if not isinstance(max_length, int) or max_length > 1_000_000:  # transformers' "unset" is 1e30
            max_length = CONTEXT_LENGTH
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab, merges = _read_files(folder / "vocab.json", folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            model = _read_json(folder / "tokenizer.json").get("model")
            if not isinstance(model, dict) or model.get("type") != "BPE":
                raise CheckpointError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer")
            try:
                vocab = model["vocab"]
                merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            except (KeyError, TypeError) as e:
                raise CheckpointError(f"{folder / 'tokenizer.json'}: malformed BPE model ({e!r})") from None
        else:
            raise CheckpointError(f"{folder}: no vocab.json + merges.txt or tokenizer.json; not a tokenizer folder")
        try:
            return cls(vocab, merges, tokens["pad"], max_length, tokens["bos"], tokens["eos"])
        except InvalidInputError as e:
            raise CheckpointError(f"tokenizer {folder}: {e}") from None

    @classmethod
    def from_dict(cls, data: dict) -> CLIPTokenizer:
        """Rebuild a tokenizer from what `to_dict` returned."""
        try:
            merges = [_parse_merge(line) for line in data["merges"]]
            return cls(data["vocab"], merges, data["pad_token"], data["max_length"], data["bos_token"], data["eos_token"])
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"tokenizer data is incomplete or malformed ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict:
        """Everything that defines this tokenizer, as JSON-ready data; `from_dict` rebuilds it."""
        return {
            "vocab": dict(self._vocab), "merges": [f"{a} {b}" for a, b in self._merges],
            "bos_token": self._bos, "eos_token": self._eos, "pad_token": self._pad, "max_length": self._max_length,
        }

    def save(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (each
        atomically), in the layout diffusers folders use; transformers' `CLIPTokenizer` loads it."""
        folder = Path(folder)
        special = {"bos_token": self._bos, "eos_token": self._eos, "unk_token": self._eos, "pad_token": self._pad}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self._max_length, **special}
        merges = "\n".join([_MERGES_HEADER, *(f"{a} {b}" for a, b in self._merges)]) + "\n"
        for name, text in (
            ("vocab.json", json.dumps(self._vocab, ensure_ascii=False)),
            ("merges.txt", merges),
            ("tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n"),
            ("special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False) + "\n"),
        ):
            atomic_write(folder / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))

    # ---- properties ---------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int:
        return self._vocab[self._bos]

    @property
    def eos_token_id(self) -> int:
        return self._vocab[self._eos]

    @property
    def pad_token_id(self) -> int:
        return self._vocab[self._pad]

    @property
    def max_length(self) -> int:
        """Row length of `__call__`'s output, BOS and EOS included (77 for CLIP)."""
        return self._max_length

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    # ---- tokenizing ---------------------------------------------------------------------------

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids (B, max_length): BOS, the text's ids cut to max_length - 2, EOS, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise InvalidInputError(f"expected a prompt string or a list of them, got {type(texts).__name__}")
        room = self._max_length - 2
        rows = []
        for text in texts:
            ids = [self.bos_token_id, *self.encode(text)[:room], self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (self._max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self._max_length)  # (B, max_length)

    def encode(self, text: str) -> list[int]:
        """The text's token ids, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise InvalidInputError(f"a prompt must be a string, got {type(text).__name__}")
        ids: list[int] = []
        for i, segment in enumerate(self._specials.split(text)):
            if i % 2:  # odd parts are the special tokens the split captured
                ids.append(self._vocab[segment])
                continue
            for word in pre_tokenize(segment):
                ids.extend(self._word_ids(word))
        return ids

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one word (cached by the caller)."""
        symbols = spell(word)
        ranks = self._ranks
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
            if best not in ranks:
                break
            symbols = merge_pair(symbols, best)
        unk = self.eos_token_id  # CLIP's unknown token; unused with a complete byte-level vocabulary
        return tuple(self._vocab.get(s, unk) for s in symbols)


def _read_json(path: Path) -> dict:
    """A JSON object from a tokenizer file; CheckpointError naming the file if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"could not read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def pre_tokenize(segment: str) -> list[str]:
    """The words BPE runs on in text holding no special token: NFC, lower-cased, split by CLIP's regex.

    A special-token literal that appears only after lower-casing ("<|ENDOFTEXT|>") becomes its pieces.
    """
    segment = unicodedata.normalize("NFC", segment).replace("Σ", "σ").lower()  # str.lower alone writes a final ς
    words: list[str] = []
    for word in _WORDS.findall(segment):
        words.extend(_SPECIAL_PIECES.findall(word) if word in (BOS_TOKEN, EOS_TOKEN) else [word])
    return words


def spell(word: str) -> list[str]:
    """A word as CLIP's byte symbols, "</w>" on the last: "hé" -> ["h", "Ã", "©</w>"]."""
    symbols = list(word.encode("utf-8").decode("latin-1").translate(_bytes_to_unicode()))
    symbols[-1] += WORD_END
    return symbols


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """`symbols` with every occurrence of `pair` merged, left to right (one BPE merge)."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged
