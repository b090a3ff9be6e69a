"""Learn a byte-level BPE vocabulary in CLIP's layout, for sdtorch's `CLIPTokenizer`.

Text is cut into words exactly as `CLIPTokenizer.encode` cuts it (special-token literals removed,
NFC, lower-case, CLIP's regex), each word is spelled with CLIP's 256 byte stand-ins with "</w>" on
its last symbol, and merges are learned the standard way (Sennrich et al. 2016): repeatedly merge
the most frequent adjacent pair of symbols, counted over distinct words weighted by their counts.
Pair counts are updated incrementally, touching only the words that hold the merged pair.

The vocabulary is laid out as CLIP's: the 256 byte symbols, the same with "</w>", one entry per
merge in merge order, then "<|startoftext|>" and "<|endoftext|>". Like CLIP's, it can therefore be
rebuilt from merges.txt alone (as open_clip and `CLIPTokenizer.default` do).
"""

from __future__ import annotations

import heapq
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

from ..errors import InvalidInputError
from ..models.tokenizer import BOS_TOKEN, EOS_TOKEN, WORD_END, CLIPTokenizer
from ..models.tokenizer import _bytes_to_unicode, merge_pair, pre_tokenize, spell  # the tokenizer's own rules

Pair = tuple[str, str]
_SPECIALS = re.compile(f"{re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)}")


def _words(text: str) -> list[str]:
    """The words `CLIPTokenizer.encode` runs BPE on (default specials; literal BOS/EOS are not words)."""
    return [word for segment in _SPECIALS.split(text) for word in pre_tokenize(segment)]


def _pairs(symbols: list[str]) -> Counter[Pair]:
    return Counter(zip(symbols, symbols[1:]))


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> tuple[dict[str, int], list[Pair]]:
    """Learn BPE merges from `texts`; return (vocab, merges) in CLIP's layout.

    Args:
        texts: training text, any number of strings (one pass; a generator is fine).
        vocab_size: total vocabulary size, specials included: at most `vocab_size - 514` merges.
            Fewer are learned when no pair occurs `min_frequency` times any more.
        min_frequency: the least count (over the whole corpus) a pair needs to be merged.

    Returns:
        vocab (token -> id, ids 0..N-1) and merges (highest priority first), ready for
        `CLIPTokenizer(vocab, merges)` or `save_bpe`. Ties between equally frequent pairs go to
        the lexicographically smallest pair, so the result depends only on the word counts.
    """
    base = list(_bytes_to_unicode().values())
    base += [s + WORD_END for s in base]
    if vocab_size < len(base) + 2:
        raise InvalidInputError(
            f"vocab_size must be at least {len(base) + 2} (bytes, bytes + </w>, specials), got {vocab_size}"
        )
    if min_frequency < 1:
        raise InvalidInputError(f"min_frequency must be at least 1, got {min_frequency}")

    word_counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise InvalidInputError(f"training texts must be strings, got {type(text).__name__}")
        word_counts.update(_words(text))
    words = [spell(w) for w in word_counts]  # distinct words as symbol lists, merged in place below
    freqs = list(word_counts.values())

    counts: Counter[Pair] = Counter()  # pair -> occurrences in the corpus
    where: defaultdict[Pair, set[int]] = defaultdict(set)  # pair -> indices of the words holding it
    for i, symbols in enumerate(words):
        for pair, n in _pairs(symbols).items():
            counts[pair] += n * freqs[i]
            where[pair].add(i)
    heap = [(-n, a, b) for (a, b), n in counts.items()]  # max count first, then the smallest pair
    heapq.heapify(heap)

    merges: list[Pair] = []
    while len(merges) < vocab_size - len(base) - 2 and heap:
        n, a, b = heapq.heappop(heap)
        if -n != counts[(a, b)]:  # stale: the count changed after this entry was pushed
            continue
        if -n < min_frequency:
            break
        merges.append((a, b))
        changed: set[Pair] = set()
        for i in where.pop((a, b)):
            old = _pairs(words[i])
            words[i] = merge_pair(words[i], (a, b))
            new = _pairs(words[i])
            for pair in old.keys() | new.keys():
                delta = new[pair] - old[pair]
                if delta:
                    counts[pair] += delta * freqs[i]
                    changed.add(pair)
                if pair in new:
                    where[pair].add(i)
                else:
                    where[pair].discard(i)
        for pair in changed:
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], *pair))
            else:
                del counts[pair]

    # Merged strings never repeat: the symbols of a span between boundaries evolve as the span alone
    # would, so a string made once is made by the same merge everywhere, and each merge adds one entry.
    ordered = base + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(ordered)}, merges


def save_bpe(
    vocab: dict[str, int], merges: list[Pair], folder: str | os.PathLike, pad_token: str = EOS_TOKEN
) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `folder`
    (atomically, through `CLIPTokenizer.save`); sdtorch and transformers both load the folder."""
    CLIPTokenizer(vocab, merges, pad_token=pad_token).save(folder)
