"""BPE training: merges against a naive reference trainer, CLIP's layout, and the folder it writes
loaded by sdtorch's and transformers' CLIPTokenizer, which must agree on every id."""

import json
import random
from collections import Counter

import pytest
import transformers

from sdtorch.data.shapes import SHAPES, caption, sample_attributes
from sdtorch.errors import InvalidInputError
from sdtorch.models.tokenizer import BOS_TOKEN, EOS_TOKEN, WORD_END, CLIPTokenizer, _bytes_to_unicode
from sdtorch.models.tokenizer import spell
from sdtorch.training.bpe import _words, save_bpe, train_bpe

VOCAB_SIZE = 1000
UNSEEN = [
    "A HEXAGON, Bright Teal, on a checkerboard!!!",
    "a red circle 🙂 next to a 🐱‍👤 and 👍🏽 🇯🇵 ✨✨✨",
    "café naïve Crème Brûlée Zürich ΣΟΦΙΑ Привет 東京タワー 한국어 مرحبا cafe\u0301",
    "a circle's corner isn't they're we've I'm you'll he'd",
    "1024x768 3.14159 100% -0.5 2024-01-01 @#$%^&* __init__ \\\\ // ~~",
    "<|startoftext|>red<|endoftext|> <|ENDOFTEXT|> x<|startoftext|>y",
    "circlecircle squares stars crossed diamonds triangles",
    "\u200b\ufeff\u00ad a\u0345b ǅ K ﬁne ½ ² ① \x00 \t\n",
    "",
]


def _captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [caption(sample_attributes(rng, "all"), rng) for _ in range(n)]


CAPTIONS = _captions(3000, seed=0)


@pytest.fixture(scope="module")
def trained():
    return train_bpe(CAPTIONS, VOCAB_SIZE)


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    save_bpe(*trained, path)
    return path


def _naive_merges(texts: list[str], max_merges: int, min_frequency: int) -> list[tuple[str, str]]:
    """The textbook trainer: recount every pair over all words before each merge."""
    words = {tuple(spell(w)): n for w, n in Counter(w for t in texts for w in _words(t)).items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, then smallest
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        words = {_merge_naive(symbols, best): n for symbols, n in words.items()}
    return merges


def _merge_naive(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _random_texts(seed: int) -> list[str]:
    """Small corpora with long runs ("aaaa"), shared prefixes and suffixes, multi-byte characters."""
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "a", "abé", "xy🙂"])
    vocab = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(2, 25))]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 30))]


@pytest.mark.parametrize("min_frequency", [1, 2, 5])
def test_merges_match_naive_trainer(trained, min_frequency):
    _, merges = trained if min_frequency == 2 else train_bpe(CAPTIONS, VOCAB_SIZE, min_frequency)
    assert merges == _naive_merges(CAPTIONS, VOCAB_SIZE - 514, min_frequency)
    for seed in range(150):
        texts = _random_texts(seed)
        max_merges = random.Random(seed).choice([1, 3, 10, 1000])
        _, merges = train_bpe(texts, 514 + max_merges, min_frequency)
        assert merges == _naive_merges(texts, max_merges, min_frequency), f"seed {seed}"


def test_layout(trained, folder):
    vocab, merges = trained
    assert 100 < len(merges) <= VOCAB_SIZE - 514
    chars = list(_bytes_to_unicode().values())
    expected = chars + [c + WORD_END for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    assert list(vocab) == expected and list(vocab.values()) == list(range(len(expected)))
    # on disk: the same vocabulary, merges with CLIP's header, CLIP's special tokens
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == vocab
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and lines[1:] == [f"{a} {b}" for a, b in merges]
    specials = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert specials == dict(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def test_vocab_size_caps_the_merges():
    vocab, merges = train_bpe(CAPTIONS, 600)
    assert len(vocab) == 600 and len(merges) == 600 - 514
    assert merges == train_bpe(CAPTIONS, VOCAB_SIZE)[1][: len(merges)]  # a prefix of the longer run's
    vocab, merges = train_bpe([], 600)
    assert len(vocab) == 514 and merges == []


def test_deterministic(trained):
    shuffled = CAPTIONS[:]
    random.Random(1).shuffle(shuffled)
    assert train_bpe(iter(shuffled), VOCAB_SIZE) == trained  # depends only on the word counts


def test_sdtorch_and_transformers_agree(trained, folder):
    ours = CLIPTokenizer.from_folder(folder)
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.vocab_size == hf.vocab_size == len(trained[0])
    special_ids = (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id)
    assert special_ids == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    texts = CAPTIONS + _captions(200, seed=99) + UNSEEN + [" ".join(CAPTIONS[:40])]  # the last runs past 77 tokens
    ref = hf(texts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours(texts).tolist() == ref
    assert [ours.encode(t) for t in UNSEEN] == [hf.encode(t, add_special_tokens=False) for t in UNSEEN]


def test_common_words_become_single_tokens(trained, folder):
    vocab, _ = trained
    tokenizer = CLIPTokenizer.from_folder(folder)
    counts = Counter(w for c in CAPTIONS for w in _words(c))
    assert {"circle", "red", "top", "left", "background"} <= counts.keys()
    for word, n in counts.items():  # with room to spare, every word seen twice is learned whole
        if n >= 2:
            assert tokenizer.encode(word) == [vocab[word + WORD_END]], word
    assert [vocab[s + WORD_END] for s in SHAPES] == tokenizer.encode(" ".join(SHAPES).upper())
    assert len(tokenizer.encode("a small red circle in the top left")) == 8


def test_words_as_the_tokenizer_sees_them(tmp_path):
    """Trained with min_frequency 1, every word of a training text is one token, for transformers
    too: so training cut and normalised the text as the tokenizer does (case, NFC, regex, specials)."""
    texts = [t for t in UNSEEN if t] + ["ΣΟΦΙΑΣ ὈΔΥΣΣΕΎΣ Straße İstanbul", "Sa\u0303o Paulo"]  # São, decomposed
    vocab, merges = train_bpe(texts, 5000, min_frequency=1)
    save_bpe(vocab, merges, tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    whole = {i for token, i in vocab.items() if token.endswith(WORD_END)}
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids and all(i in whole or i in (hf.bos_token_id, hf.eos_token_id) for i in ids), text
    assert not any("|" in a + b for a, b in train_bpe(["x <|endoftext|> y <|startoftext|>"] * 3, 600)[1])


def test_pad_token(trained, tmp_path):
    save_bpe(*trained, tmp_path, pad_token="!")
    ours, hf = CLIPTokenizer.from_folder(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.pad_token_id == hf.pad_token_id == trained[0]["!"] == 0
    texts = CAPTIONS[:50] + ["wow!! a red star!"]
    assert ours(texts).tolist() == hf(texts, padding="max_length", max_length=77, truncation=True).input_ids


def test_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="at least 514"):
        train_bpe(CAPTIONS, 513)
    with pytest.raises(InvalidInputError, match="min_frequency"):
        train_bpe(CAPTIONS, 1000, min_frequency=0)
    with pytest.raises(InvalidInputError, match="strings"):
        train_bpe(["a red circle", None], 1000)
    with pytest.raises(InvalidInputError, match="pad_token"):
        save_bpe(*train_bpe(CAPTIONS[:10], 600), tmp_path, pad_token="<pad>")
