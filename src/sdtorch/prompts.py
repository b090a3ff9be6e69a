"""Prompts the AUTOMATIC1111 way: emphasis weights, 75-token chunks, BREAK, clip skip.

A prompt becomes the UNet's context in three steps, each giving what A1111 gives:

1. `parse_prompt_attention` splits the text into runs of equal weight: `(word)` multiplies by 1.1,
   `[word]` divides by 1.1, `(word:1.3)` multiplies by 1.3; brackets nest and multiply;
   `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; brackets left open still count up to the end of the
   text; closers with no opener are literal text. `BREAK` (a separate word) becomes a ("BREAK", -1) item.
2. `tokenize_prompt` tokenizes each run on its own and packs the tokens into chunks of 75, each
   wrapped as [BOS] + 75 + [EOS] = 77 ids with one weight per id. A chunk that fills up moves the
   words after its last comma to the next chunk when that comma lies within the last 20 tokens.
   The name of a textual-inversion embedding the text encoder has loaded (adapters/embeddings.py) becomes
   the ids of its n vectors, kept together in one chunk.
3. `encode_prompts` encodes every chunk of every prompt in one text-encoder call, scales each
   token's vector by its weight, restores each chunk's original mean, and concatenates a prompt's
   chunks along the token axis: (B, 77 * chunks, D). `encode_prompt_groups` does the same for the
   texts of prompt-editing schedules, restoring means over each schedule's texts together, as A1111.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import InvalidInputError
from .models.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from .adapters.embeddings import EmbeddingDatabase

CHUNK_LENGTH = 75  # prompt tokens per chunk; BOS and EOS make it 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0

# One match per lexical piece, tried in this order (the order decides what a piece means).
_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]                  # escaped bracket or backslash: the literal character
    | \\                          # any other backslash: dropped
    | \( | \[                     # openers
    | :\s*([+-]?[.\d]+)\s*\)      # ":1.3)" closes a round bracket with an explicit weight
    | \) | \]                     # closers
    | [^\\()\[\]:]+               # plain text
    | :                           # a colon that starts no weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) runs; adjacent runs of equal weight are merged.

    A `BREAK` between words becomes its own ("BREAK", -1.0) item (brackets around it multiply that
    -1 too, as in A1111). An empty prompt gives [("", 1.0)].

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"a prompt must be a string, got {type(text).__name__}")
    runs: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    round_open: list[int] = []  # index into `runs` where each open bracket started
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            run[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:
                raise InvalidInputError(f"prompt: {piece!r} is not a valid emphasis weight") from None
            multiply_from(round_open.pop(), value)
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:  # plain text, or a bracket/weight with nothing to close
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append(["BREAK", BREAK_WEIGHT])
                runs.append([part, 1.0])

    for start in round_open:  # unclosed brackets reach to the end of the text
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


@dataclass
class PromptChunk:
    """One text-encoder input: 77 token ids (BOS, 75 prompt or padding ids, EOS) and a weight per id."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


def tokenize_prompt(
    tokenizer: CLIPTokenizer,
    text: str,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingDatabase | None = None,
) -> list[PromptChunk]:
    """Tokenize a prompt into 77-token chunks with per-token weights, as A1111's `tokenize_line`.

    When a chunk holds 75 tokens and the next token is not a comma, the tokens after the chunk's
    last comma move to the next chunk if that comma is among the chunk's last `comma_backtrack`
    tokens (0 turns this off). BREAK closes the current chunk, even an empty one. An empty prompt
    gives one chunk. Where the tokenizer's pad id differs from EOS (SD2), every id after a chunk's
    first EOS becomes the pad id.

    Where the tokens of a run start with the name of an embedding in `embeddings` (the longest name
    wins), the name's tokens become the ids of the embedding's n vectors, each with the run's weight;
    when they do not fit in the open chunk, they start the next one (A1111 never splits an embedding).
    """
    comma = tokenizer.encode(",")
    comma_id = comma[0] if len(comma) == 1 else None
    chunks: list[PromptChunk] = []
    tokens: list[int] = []  # the open chunk, without BOS/EOS
    weights: list[float] = []
    last_comma = -1  # index in `tokens` of the open chunk's last comma

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append(_wrap(tokenizer, tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for text_run, weight in parse_prompt_attention(text):
        if text_run == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        run = tokenizer.encode(text_run)
        position = 0  # index in `run` of the next token to place
        while position < len(run):
            token = run[position]
            if token == comma_id:
                last_comma = len(tokens)
            elif (
                comma_backtrack
                and len(tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close_chunk()
                tokens, weights = moved, moved_weights
            if len(tokens) == CHUNK_LENGTH:
                close_chunk()
            match = embeddings.match(run, position) if embeddings is not None else None
            if match is None:
                tokens.append(token)
                weights.append(weight)
                position += 1
                continue
            vector_ids, name_length = match
            if len(tokens) + len(vector_ids) > CHUNK_LENGTH:
                close_chunk()
            tokens += vector_ids
            weights += [weight] * len(vector_ids)
            position += name_length

    if tokens or not chunks:
        close_chunk()
    return chunks


def _wrap(tokenizer: CLIPTokenizer, tokens: list[int], weights: list[float]) -> PromptChunk:
    """[BOS] + tokens padded with EOS to 75 + [EOS]; SD2 tokenizers pad after the first EOS instead."""
    padding = CHUNK_LENGTH - len(tokens)
    ids = [tokenizer.bos_token_id, *tokens, *[tokenizer.eos_token_id] * padding, tokenizer.eos_token_id]  # 77
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        first_eos = ids.index(tokenizer.eos_token_id)
        ids[first_eos + 1 :] = [tokenizer.pad_token_id] * (len(ids) - first_eos - 1)
    return PromptChunk(tokens=ids, multipliers=[1.0, *weights, *[1.0] * padding, 1.0])


def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: nn.Module, prompts: list[str], clip_skip: int = 1
) -> torch.Tensor:
    """Encode A1111-style prompts into the UNet's context (B, 77 * k, D).

    All chunks of all prompts go through `text_encoder(ids, clip_skip=clip_skip)` in one call.
    Each chunk's output is scaled token by token by its weights, then multiplied by
    (mean before) / (mean after), both means over the chunk's whole (77, D) output: A1111 takes the
    mean over the batch it encodes, which holds one prompt (`encode_prompt_groups` for its
    prompt-editing variants). k is the largest chunk count among `prompts`; shorter prompts are
    padded with the encoding of an empty chunk. Prompts of at most 75 tokens with no emphasis give
    exactly `text_encoder(tokenizer(prompts), clip_skip)`. Names of the embeddings the text encoder has
    loaded (`CLIPTextEncoder.textual_inversion`) become their vectors.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidInputError("prompts must be a non-empty list of strings")
    embeddings = _embeddings_of(text_encoder)
    per_prompt = [tokenize_prompt(tokenizer, p, embeddings=embeddings) for p in prompts]
    k = max(len(chunks) for chunks in per_prompt)
    empty = tokenize_prompt(tokenizer, "")[0]
    chunks = [c for cs in per_prompt for c in cs + [empty] * (k - len(cs))]  # prompt-major, B * k
    z, _ = _encode_chunks(text_encoder, chunks, list(range(len(chunks))), clip_skip)  # (B*k, 77, D)
    return z.reshape(len(prompts), k * z.shape[1], z.shape[2])  # (B, 77*k, D)


def encode_prompt_groups(
    tokenizer: CLIPTokenizer, text_encoder: nn.Module, groups: list[list[str]], clip_skip: int = 1
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Encode groups of prompts as A1111 encodes one prompt's editing schedule: (contexts (n, 77 * k, D) per
    group, pooled embeddings (n, P) per group, or None where the text encoder has none).

    A group's n prompts are padded with empty chunks to its longest (k chunks), and each chunk position
    is mean-restored over the whole group's (n, 77, D) outputs (A1111 takes the means over the batch it
    encodes: the schedule's texts). Every chunk of every group goes through the text encoder in one call.
    A group of one prompt gives what `encode_prompts` gives for that prompt, embeddings included.
    A prompt's pooled embedding (SDXL) is its first chunk's, as A1111 takes it.
    """
    if not groups or not all(isinstance(g, (list, tuple)) and g for g in groups):
        raise InvalidInputError("groups must be a non-empty list of non-empty lists of prompts")
    empty = tokenize_prompt(tokenizer, "")[0]
    embeddings = _embeddings_of(text_encoder)
    chunks: list[PromptChunk] = []
    positions: list[int] = []  # for each chunk, the index of its (group, chunk position)
    shapes: list[tuple[int, int]] = []  # (n, k) per group
    first = 0  # the first position index of the group
    for group in groups:
        per_prompt = [tokenize_prompt(tokenizer, p, embeddings=embeddings) for p in group]
        k = max(len(cs) for cs in per_prompt)
        for cs in per_prompt:
            chunks += cs + [empty] * (k - len(cs))
            positions += range(first, first + k)
        shapes.append((len(group), k))
        first += k
    z, pooled = _encode_chunks(text_encoder, chunks, positions, clip_skip)  # (R, 77, D), (R, P) | None
    contexts, pools, row = [], [], 0
    for n, k in shapes:
        contexts.append(z[row : row + n * k].reshape(n, k * z.shape[1], z.shape[2]))  # (n, 77*k, D)
        pools.append(None if pooled is None else pooled[row : row + n * k : k])  # (n, P): each first chunk's
        row += n * k
    return contexts, pools


def _encode_chunks(
    text_encoder: nn.Module, chunks: list[PromptChunk], positions: list[int], clip_skip: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode chunks in one call: (contexts (R, 77, D), pooled (R, P) or None). Each token is weighted and
    the mean of every set of chunks that share a `positions` index (R indices) restored, separately for
    each of the encoder's `part_widths` (SDXL's encoders side by side, each weighted on its own as A1111
    does); the pooled embeddings are not weighted."""
    device = _device_of(text_encoder)
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)  # (R, 77)
    if hasattr(text_encoder, "encode"):
        z, pooled = text_encoder.encode(ids, clip_skip=clip_skip)  # (R, 77, D), (R, P) | None
    else:
        z, pooled = text_encoder(ids, clip_skip=clip_skip), None
    weights = torch.tensor([c.multipliers for c in chunks], dtype=z.dtype, device=z.device)  # (R, 77)
    index = torch.tensor(positions, device=z.device)  # (R,)
    widths = getattr(text_encoder, "part_widths", (z.shape[-1],))
    parts = [_weighted(part, weights, index) for part in z.split(list(widths), dim=-1)]
    return torch.cat(parts, dim=-1), pooled


def _weighted(z: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """z (R, 77, D) weighted token by token (R, 77), each set of rows sharing an `index` brought back to its
    mean before weighting (A1111's "Original" emphasis)."""
    original_mean = z.mean(dim=(1, 2))  # (R,)
    z = z * weights.unsqueeze(-1)  # (R, 77, D)
    weighted_mean = z.mean(dim=(1, 2))  # (R,)
    sets = int(index.max()) + 1
    count = torch.zeros(sets, dtype=z.dtype, device=z.device).index_add_(0, index, torch.ones_like(original_mean))
    before = torch.zeros_like(count).index_add_(0, index, original_mean) / count  # (sets,) mean of each set
    after = torch.zeros_like(count).index_add_(0, index, weighted_mean) / count
    # unweighted sets (after == before) keep their values, as do sets whose mean after weighting is 0: an output
    # whose final LayerNorm has no bias has a mean of 0 but for rounding (0 / 0 would make it NaN)
    factor = torch.where((after == before) | (after == 0), torch.ones_like(after), before / after)  # (sets,)
    return z * factor[index][:, None, None]


def _embeddings_of(text_encoder: nn.Module) -> EmbeddingDatabase | None:
    """The textual-inversion embeddings loaded into the text encoder (None for none, or an encoder without them)."""
    return getattr(text_encoder, "textual_inversion", None)


def _device_of(module: nn.Module) -> torch.device:
    """Where the module's weights live (CPU for a module without parameters)."""
    param = next(module.parameters(), None) if isinstance(module, nn.Module) else None
    return param.device if param is not None else torch.device("cpu")
