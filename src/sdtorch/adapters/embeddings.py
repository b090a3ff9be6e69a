"""Textual-inversion embeddings: read the files people download and use them in prompts, as A1111 does.

An embedding is a name and n learned vectors (n, D) in the text encoder's token-embedding space (D: the
encoder's width, 768 for SD1, 1024 for SD2). Writing the name in a prompt puts the n vectors where the
name's tokens were, each vector taking one of a chunk's 75 token positions. The path of a vector:

1. `read_embedding` reads a file, its format judged by content (pickles only with `weights_only`):
   - A1111 `.pt` / `.bin`: a pickled dict with `string_to_param` = {"*": (n, D)}, `name`, `step`, ...
   - A1111 `.safetensors`: `emb_params` (n, D)
   - diffusers `learned_embeds.safetensors` / `.bin`: {token: (D,) or (n, D)}
   The name is the file's stem for A1111 files and the token for diffusers files, unless the caller gives one.
   An SDXL embedding (A1111 / kohya, `.safetensors` or `.pt`) holds n vectors for each of SDXL's encoders:
   `clip_l` (n, 768) for CLIP ViT-L and `clip_g` (n, 1280) for OpenCLIP bigG; `read_sdxl_embedding` reads it
   as one `Embedding` per key, named by the file's stem.
2. `load_embedding` adds it to the text encoder's `EmbeddingDatabase` (`CLIPTextEncoder.textual_inversion`),
   which gives each vector a token id from the encoder's `vocab_size` on and keeps each name's token ids.
   SDXL: each of the `SDXLTextEncoder`'s encoders keeps its own database and gets its key's vectors (A1111's
   `textual_inversion_key`; the refiner's bigG takes `clip_g`). Every embedding goes into all of them at once,
   in the same order with the same count, so a name has the same ids in each, and the SDXLTextEncoder's
   `textual_inversion` (the first encoder's database) is what prompts look names up in.
3. `prompts.tokenize_prompt` finds those name token sequences in each emphasis run's tokens, as A1111's
   `EmbeddingDatabase.find_embedding_at_position` does, and writes the vectors' ids in their place; an
   embedding that does not fit in the open chunk starts the next one (A1111's `tokenize_line`).
4. `CLIPTextEmbeddings` looks ids from `vocab_size` on up in the database's vector table, before the position
   embedding is added. The trained token table is never changed, so unloading restores the outputs exactly.

Textual-inversion training (training/textual_inversion.py) starts from `init_vectors` (A1111's
`create_embedding`) and adds the embedding with `add_trainable_embedding`: its vectors are then a parameter
that the table reads live, so gradients of the encoder's output reach them and optimizer steps show at once.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoints.io import detect_format, file_sha256, read_pickle_checkpoint, read_safetensors
from ..errors import CheckpointError, InvalidInputError
from ..models.sdxl_text import SDXLTextEncoder
from ..models.tokenizer import CLIPTokenizer
from ..prompts import CHUNK_LENGTH

if TYPE_CHECKING:
    from ..models.clip import CLIPTextEncoder
    from ..pipeline import Pipeline

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")  # the files A1111 reads from its embeddings folder as tensors
MAX_FILE_BYTES = 64 * 1024 * 1024  # an embedding takes kilobytes; a larger file is a model in the wrong place


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding: its name, its vectors (n, D) in float32 and the file it came from
    ("" for one being trained, whose vectors are an `nn.Parameter`)."""

    name: str
    vectors: torch.Tensor  # (n, D)
    path: str


def read_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """Read an A1111 (`.pt`, `.bin`, `.safetensors`) or diffusers (`learned_embeds.*`) embedding file.

    name: the name prompts use; by default the file's stem (A1111) or the file's token (diffusers).
    Raises CheckpointError for a file that is no embedding, holds several, or has non-finite vectors,
    and UnsafeCheckpointError for a pickle that asks for anything but tensors and plain containers.
    """
    path = Path(path)
    found_name, value = _find_vectors(path, _read_contents(path))
    return Embedding(name if name is not None else found_name, _checked_vectors(path, value), str(path))


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's vectors for CLIP ViT-L and for OpenCLIP bigG


def read_sdxl_embedding(path: str | os.PathLike, name: str | None = None) -> dict[str, Embedding]:
    """Read an SDXL embedding (A1111 / kohya: `clip_l` (n, 768) and `clip_g` (n, 1280), `.safetensors` or `.pt`):
    {"clip_l": Embedding, "clip_g": Embedding}, both named `name` or the file's stem.

    Raises CheckpointError for an SD1 / SD2 embedding, a file that is no embedding, or vector counts that differ.
    """
    path = Path(path)
    data = _read_contents(path)
    if not isinstance(data, dict) or not all(key in data for key in SDXL_EMBEDDING_KEYS):
        held = [key for key in SDXL_EMBEDDING_KEYS if isinstance(data, dict) and key in data]
        if held:
            missing = [key for key in SDXL_EMBEDDING_KEYS if key not in held]
            raise CheckpointError(f"{path}: an SDXL embedding needs {' and '.join(SDXL_EMBEDDING_KEYS)} vectors; "
                                  f"this one has no {missing[0]}")
        _, value = _find_vectors(path, data)  # says what else the file is, if it is no embedding at all
        width = f" of width {value.shape[-1]}" if isinstance(value, torch.Tensor) and value.ndim else ""
        raise CheckpointError(
            f"{path}: an SD1 / SD2 embedding (one table of vectors{width}); an SDXL model takes embeddings made "
            f"for SDXL, which hold {' and '.join(SDXL_EMBEDDING_KEYS)} vectors"
        )
    parts = {key: _checked_vectors(path, data[key], key) for key in SDXL_EMBEDDING_KEYS}
    counts = {key: vectors.shape[0] for key, vectors in parts.items()}
    if len(set(counts.values())) != 1:
        raise CheckpointError(
            f"{path}: the SDXL embedding's vector counts differ ({counts}): a name takes the same token positions "
            "in every encoder"
        )
    name = path.stem if name is None else name
    return {key: Embedding(name, vectors, str(path)) for key, vectors in parts.items()}


def _read_contents(path: Path) -> object:
    """The contents of an embedding file, its format judged by content; refuses files far too large."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read embedding {path}: {e.strerror or e}") from None
    if size > MAX_FILE_BYTES:
        raise CheckpointError(
            f"{path}: {size:,} bytes is far too large for a textual-inversion embedding (they take kilobytes); "
            "is it a model checkpoint?"
        )
    if detect_format(path) == "safetensors":
        return read_safetensors(path)[0]
    return read_pickle_checkpoint(path)


def _find_vectors(path: Path, data: object) -> tuple[str, object]:
    """(the name the file gives, the vectors entry) of an A1111 or diffusers embedding's contents."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a textual-inversion embedding (it holds a {type(data).__name__})")
    if "string_to_param" in data:  # A1111 .pt / .bin
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise CheckpointError(f"{path}: string_to_param holds {count} terms; an A1111 embedding holds one")
        return path.stem, next(iter(params.values()))
    if "emb_params" in data:  # A1111 .safetensors
        return path.stem, data["emb_params"]
    if "clip_l" in data and "clip_g" in data:
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l + clip_g vectors): it loads into SDXL models only")
    if len(data) == 1:  # diffusers: {token: vectors}
        token, value = next(iter(data.items()))
        if isinstance(token, str):
            return token, value
    raise CheckpointError(
        f"{path}: not a textual-inversion embedding: expected string_to_param (A1111 .pt), emb_params "
        f"(A1111 .safetensors) or one {{token: vectors}} entry (diffusers), found keys {reprlib.repr(list(data))}"
    )


def _checked_vectors(path: Path, value: object, key: str = "") -> torch.Tensor:
    """The vectors as a float32 (n, D) tensor, 1 <= n <= 75; a (D,) vector becomes (1, D). key: which of an
    SDXL embedding's tables they are, for the messages."""
    what = f"the embedding's {key} vectors" if key else "the embedding's vectors"
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise CheckpointError(f"{path}: {what} are {kind}, not floating-point numbers")
    vectors = value.detach().reshape(1, -1) if value.ndim == 1 else value.detach()  # (n, D)
    if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= CHUNK_LENGTH or vectors.shape[1] == 0:
        raise CheckpointError(
            f"{path}: {what} have shape {list(value.shape)}; expected (n, width) with 1 <= n <= "
            f"{CHUNK_LENGTH} (a prompt chunk holds {CHUNK_LENGTH} tokens)"
        )
    if not torch.isfinite(vectors).all():
        raise CheckpointError(f"{path}: {what} contain NaN or infinity")
    return vectors.to(torch.float32).contiguous()


class EmbeddingDatabase:
    """The embeddings one text encoder has loaded, by name, in the order loaded.

    Vector i of the concatenated table `vectors` (E, D) has token id `vocab_size + i`: ids the trained
    token table does not have, which `CLIPTextEmbeddings` looks up here instead. The table is concatenated
    from the embeddings' own tensors at each read, so a trainable embedding's parameter gets gradients.
    """

    def __init__(self, vocab_size: int, width: int):
        self.vocab_size = vocab_size
        self.width = width
        self._entries: dict[str, tuple[Embedding, tuple[int, ...]]] = {}  # name -> (embedding, the name's token ids)
        self._ids: dict[str, list[int]] = {}  # name -> its vectors' token ids
        self._by_first_token: dict[int, list[tuple[tuple[int, ...], str]]] = {}  # longest name first
        self.used: set[str] = set()  # names `match` found since the caller last cleared it (A1111's embeddings_used)
        self._hashes: dict[str, str] = {}  # name -> A1111's short hash of its file (none for one being trained)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def vectors(self) -> torch.Tensor:
        """Every loaded vector in load order (E, D): row i has token id `vocab_size + i`."""
        rows = [embedding.vectors for embedding, _ in self._entries.values()]
        return torch.cat(rows) if rows else torch.zeros(0, self.width)  # (E, D)

    @property
    def counts(self) -> dict[str, int]:
        """Name -> number of vectors (token positions the name takes in a prompt)."""
        return {name: emb.vectors.shape[0] for name, (emb, _) in self._entries.items()}

    def check(self, embedding: Embedding, name_ids: Sequence[int]) -> None:
        """Raise the error `add` would raise for this embedding, adding nothing."""
        if not name_ids:
            raise InvalidInputError(f"embedding name {embedding.name!r} has no tokens: no prompt could use it")
        if embedding.vectors.shape[1] != self.width:
            raise CheckpointError(
                f"{embedding.path}: embedding {embedding.name!r} has vectors of width {embedding.vectors.shape[1]}, "
                f"but this text encoder's width is {self.width} (SD1 768, SD2 1024, SDXL clip_l 768 and clip_g "
                "1280): it was made for another model"
            )
        for other, (_, other_ids) in self._entries.items():
            if other != embedding.name and other_ids == tuple(name_ids):
                raise InvalidInputError(
                    f"embedding name {embedding.name!r} tokenizes as the loaded {other!r} does (names are "
                    "lower-cased): prompts could not tell them apart; pass another name"
                )

    def add(self, embedding: Embedding, name_ids: Sequence[int]) -> None:
        """Add an embedding whose name the tokenizer spells `name_ids`; one of the same name is replaced (A1111)."""
        name_ids = tuple(name_ids)
        self.check(embedding, name_ids)
        self._entries[embedding.name] = (embedding, name_ids)
        self._hashes.pop(embedding.name, None)
        if embedding.path:
            self._hashes[embedding.name] = file_sha256(embedding.path)[:12]
        self._rebuild()

    def remove(self, name: str) -> None:
        if name not in self._entries:
            loaded = ", ".join(self._entries) or "none"
            raise InvalidInputError(f"no embedding named {name!r} is loaded (loaded: {loaded})")
        del self._entries[name]
        self._hashes.pop(name, None)
        self._rebuild()

    def _rebuild(self) -> None:
        """Number the vectors in load order and index the names by their first token, longest name first."""
        self._ids, self._by_first_token = {}, {}
        next_id = self.vocab_size
        for name, (embedding, name_ids) in self._entries.items():
            count = embedding.vectors.shape[0]
            self._ids[name] = list(range(next_id, next_id + count))
            next_id += count
            self._by_first_token.setdefault(name_ids[0], []).append((name_ids, name))
        for candidates in self._by_first_token.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)

    def match(self, tokens: Sequence[int], offset: int) -> tuple[list[int], int] | None:
        """(the vector ids, the number of tokens the name takes) of the embedding whose name's tokens start
        at `tokens[offset]`, the longest name winning; None where no name starts there."""
        for name_ids, name in self._by_first_token.get(tokens[offset], ()):
            if tuple(tokens[offset : offset + len(name_ids)]) == name_ids:
                self.used.add(name)
                return self._ids[name], len(name_ids)
        return None

    def hashes(self, names: Iterable[str]) -> dict[str, str]:
        """{name: A1111's short hash (the first 12 hex digits of the file's sha256)} of the loaded embeddings
        among `names`, for the infotext's "TI hashes"; an embedding being trained has no file and is left out."""
        return {name: self._hashes[name] for name in sorted(names) if name in self._hashes}


def load_embedding(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextEncoder | SDXLTextEncoder,
    path: str | os.PathLike,
    name: str | None = None,
) -> str:
    """Read an embedding file and make `text_encoder` use it wherever its name is in a prompt; returns the name.

    An SDXLTextEncoder takes SDXL embeddings (`read_sdxl_embedding`), each of its encoders its key's vectors.
    Raises CheckpointError when its width is not the text encoder's (an SD2 embedding on SD1, ...) or it was
    made for another family (an SD1 embedding on SDXL, ...); then nothing is loaded.
    """
    if not isinstance(text_encoder, SDXLTextEncoder):
        embedding = read_embedding(path, name)
        _add(tokenizer, text_encoder, embedding)
        return embedding.name
    parts = read_sdxl_embedding(path, name)
    encoders = list(zip(text_encoder.textual_inversion_keys, text_encoder.encoders))
    vocab_sizes = {encoder.config.vocab_size for encoder in text_encoder.encoders}
    if len(vocab_sizes) != 1:  # the encoders read one id sequence: a vector's id must mean the same in each
        raise InvalidInputError(f"SDXL's text encoders have different vocab sizes {sorted(vocab_sizes)}: "
                                "their embeddings' token ids could not agree")
    name_ids = tokenizer.encode(parts[SDXL_EMBEDDING_KEYS[0]].name)
    for key, encoder in encoders:  # every check first: the encoders' databases never get out of step
        _database(encoder).check(parts[key], name_ids)
    for key, encoder in encoders:
        _add(tokenizer, encoder, parts[key])
    return parts[SDXL_EMBEDDING_KEYS[0]].name


def _database(text_encoder: CLIPTextEncoder) -> EmbeddingDatabase:
    """The text encoder's database, or a new empty one for it (not yet attached)."""
    database = text_encoder.textual_inversion
    if database is None:
        database = EmbeddingDatabase(text_encoder.config.vocab_size, text_encoder.config.width)
    return database


def _add(tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, embedding: Embedding) -> None:
    """Add `embedding` to the text encoder's database (created on first use)."""
    database = _database(text_encoder)
    database.add(embedding, tokenizer.encode(embedding.name))
    text_encoder.textual_inversion = database


def init_vectors(tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, init_text: str, count: int) -> torch.Tensor:
    """Starting vectors (count, D) float32 of a new embedding, from the token embeddings of `init_text`.

    As A1111's `create_embedding`: the text's first `count` tokens (T of them) are looked up in the trained
    token table, and vector i is token floor(i * T / count)'s: "red ball" with count 4 gives red, red,
    ball, ball. Raises InvalidInputError when `init_text` has no tokens (A1111 would start from zeros).
    """
    _refuse_sdxl_training(text_encoder)
    if not 1 <= count <= CHUNK_LENGTH:
        raise InvalidInputError(f"an embedding has 1 to {CHUNK_LENGTH} vectors (a prompt chunk's tokens), got {count}")
    ids = tokenizer.encode(init_text)[:count]
    if not ids:
        raise InvalidInputError(
            f"init text {init_text!r} has no tokens: the new vectors would have nothing to start from; give a word "
            "close to the concept (\"dog\", \"painting\")"
        )
    table = text_encoder.embeddings.token_embedding.weight  # (vocab, D)
    rows = [ids[i * len(ids) // count] for i in range(count)]
    return table.detach()[rows].to("cpu", torch.float32)  # (count, D), on the CPU as every loaded vector is


def add_trainable_embedding(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, name: str, vectors: torch.Tensor
) -> nn.Parameter:
    """Load `vectors` (n, D) as the embedding `name` and return them as a trainable parameter (float32, CPU).

    The parameter stays on the CPU beside the other loaded vectors (the text encoder moves the table to its
    device at each call), so an optimizer over it steps on the CPU: n * D numbers, whatever the model's device.

    Prompts naming it read the parameter itself, so the text encoder's output has gradients for it
    (and for nothing else once the encoder is frozen); `unload_embedding(text_encoder, name)` removes it.
    """
    _refuse_sdxl_training(text_encoder)
    parameter = nn.Parameter(vectors.detach().to("cpu", torch.float32, copy=True))  # (n, D)
    _add(tokenizer, text_encoder, Embedding(name, parameter, ""))
    return parameter


def _refuse_sdxl_training(text_encoder: nn.Module) -> None:
    if isinstance(text_encoder, SDXLTextEncoder):
        raise InvalidInputError("textual-inversion training for SDXL models is not supported yet (SDXL embeddings "
                                "load and run: Pipeline.load_embedding)")


def unload_embedding(text_encoder: CLIPTextEncoder | SDXLTextEncoder, name: str | None = None) -> None:
    """Forget the embedding `name` (None: all of them); prompts then encode exactly as before it was loaded.
    SDXL: from every encoder."""
    if isinstance(text_encoder, SDXLTextEncoder):
        if name is not None and name not in (text_encoder.encoders[0].textual_inversion or ()):
            unload_embedding(text_encoder.encoders[0], name)  # raises the error that names what is loaded
        for encoder in text_encoder.encoders:
            unload_embedding(encoder, name)
        return
    database = text_encoder.textual_inversion
    if name is None:
        text_encoder.textual_inversion = None
        return
    if database is None:
        raise InvalidInputError(f"no embedding named {name!r} is loaded (loaded: none)")
    database.remove(name)
    if not len(database):
        text_encoder.textual_inversion = None


def loaded_embeddings(text_encoder: CLIPTextEncoder | SDXLTextEncoder) -> dict[str, int]:
    """Name -> number of vectors of every embedding `text_encoder` has loaded (SDXL: each encoder has them all)."""
    database = text_encoder.textual_inversion
    return database.counts if database is not None else {}


@dataclass
class FolderLoadReport:
    """What `load_embeddings_dir` did: the names it loaded and a "path: why" line for every file it skipped."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def load_embeddings_dir(pipe: Pipeline, folder: str | os.PathLike) -> FolderLoadReport:
    """Load every embedding file under `folder` and its subfolders, as A1111's `--embeddings-dir`.

    Each embedding is named by its file's stem, as A1111 names them all (diffusers files included).
    Files that are not `.pt`, `.bin` or `.safetensors`, or fail to load (not an embedding, unsafe,
    another model's width), are skipped and listed in the report with the reason; nothing is skipped silently.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"embeddings folder {folder} does not exist or is not a folder")
    report = FolderLoadReport()
    paths = sorted(Path(root) / name for root, _, names in os.walk(folder) for name in names)
    for path in paths:
        if path.suffix.lower() not in EMBEDDING_SUFFIXES:
            report.skipped.append(f"{path}: not an embedding file (expected {', '.join(EMBEDDING_SUFFIXES)})")
            continue
        try:
            report.loaded.append(pipe.load_embedding(path, name=path.stem))
        except (CheckpointError, InvalidInputError) as e:
            report.skipped.append(f"{path}: {str(e).removeprefix(f'{path}: ')}")
    return report
