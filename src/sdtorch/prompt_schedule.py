"""Prompt editing, alternation and composable AND, with AUTOMATIC1111's grammar and step semantics.

    "a [fantasy:cyberpunk:16] landscape" at 20 steps -> [(16, "a fantasy landscape"), (20, "a cyberpunk landscape")]

A prompt's *schedule* lists (end_step, text): the text holds for the model evaluations counted from 0
up to and including end_step (A1111 `reconstruct_cond_batch`: the first entry with step <= end_step).

Grammar (A1111 `modules/prompt_parser.py`, there a lark grammar; here a recursive-descent parser):

    [from:to:when]   `from` up to step `when`, then `to`;  [to:when] starts empty;  [from::when] ends empty
    [a|b|c]          alternation: a at step 1, b at step 2, c at step 3, a at step 4, ...
    (x) (x:1.2) [x]  emphasis: kept as text here (`prompts.parse_prompt_attention` reads it later)

`when` is a number (lark's SIGNED_NUMBER, exponents included). Written with a "." it is a fraction of the
steps (`0.25`, `1.0`), else a step (`16`), truncated to an integer and capped at the steps. In a hires-fix
pass (`hires_steps` given) integers count on from the first pass's steps and fractions from 1.0, so
`[a:b:25]` after a 20-step first pass switches at hires step 5 and `[a:b:1.5]` half way through the pass.
Inside a bracket construct, plain text is anything but `\\ [ ] ( ) : |`, or a backslash and the next
character; at the top level brackets and colons that form no construct are literal text. A prompt the
grammar cannot read (a `|` outside alternation, a backslash at the end or before a line break) is used
whole, unscheduled, as A1111 does.

`encode_conditioning` turns a batch's prompts and negatives into the `Conditioning` the sampler reads
at each model evaluation, composable AND included.

Where A1111's Earley parser finds several readings of stray brackets it picks one by hash order (so it
may vary between runs, e.g. "[a:1]]"); this parser always keeps the bracket construct.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from .errors import InvalidInputError
from .models.tokenizer import CLIPTokenizer
from .prompts import encode_prompt_groups
from .sampling.denoiser import Conditioning, ScheduledContext

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # `.` stops at a line break, as in A1111's grammar
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACE = re.compile(r"\s*")
_AND = re.compile(r"\bAND\b")
_SUBPROMPT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)  # "text :weight"


@dataclass(frozen=True)
class _Edit:
    """[before:after:when]; `before` is None for [after:when]."""

    before: _Node | None
    after: _Node
    when: str  # the number as written: its "." decides fraction or step


@dataclass(frozen=True)
class _Alternate:
    options: tuple[_Node, ...]


_Node = Union[str, tuple["_Node", ...], _Edit, _Alternate]


class _Parser:
    """Recursive descent over one prompt; bracket constructs are memoised by position."""

    def __init__(self, text: str):
        self.text = text
        self.constructs: dict[int, tuple[_Node, int] | None] = {}

    def char(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def document(self) -> tuple[_Node, ...] | None:
        """The whole text: constructs, text, and stray brackets/colons; None if it cannot be read."""
        nodes: list[_Node] = []
        i = 0
        while i < len(self.text):
            c = self.text[i]
            found = self.construct(i) if c in "([" else None
            if found is not None:
                node, i = found
            elif c in "()[]:":
                node, i = c, i + 1
            else:
                match = _PLAIN.match(self.text, i)
                if match is None:  # "|" outside alternation, or a backslash with nothing to escape
                    return None
                node, i = match.group(), match.end()
            nodes.append(node)
        return tuple(nodes)

    def prompt(self, i: int) -> tuple[tuple[_Node, ...], int]:
        """Text and constructs from i up to the first character that neither can start."""
        nodes: list[_Node] = []
        while True:
            found = self.construct(i) if self.char(i) in ("(", "[") else None
            if found is None:
                match = _PLAIN.match(self.text, i)
                if match is None:
                    return tuple(nodes), i
                found = match.group(), match.end()
            node, i = found
            nodes.append(node)

    def construct(self, i: int) -> tuple[_Node, int] | None:
        """The bracket construct starting at i and the index after it, or None."""
        if i not in self.constructs:
            self.constructs[i] = self._construct(i)
        return self.constructs[i]

    def _construct(self, i: int) -> tuple[_Node, int] | None:
        opener = self.text[i]
        first, j = self.prompt(i + 1)
        sep = self.char(j)
        if opener == "(":
            if sep == ")":
                return ("(", first, ")"), j + 1
            if sep == ":":
                second, k = self.prompt(j + 1)
                if self.char(k) == ")":
                    return ("(", first, ":", second, ")"), k + 1
            return None
        if sep == "]":
            return ("[", first, "]"), j + 1
        if sep == "|":
            options = [first]
            while self.char(j) == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            return (_Alternate(tuple(options)), j + 1) if self.char(j) == "]" else None
        if sep == ":":
            when = self.when(j + 1)
            if when is not None:  # [to:when]
                return _Edit(None, first, when[0]), when[1]
            second, k = self.prompt(j + 1)
            if self.char(k) == ":" and (when := self.when(k + 1)) is not None:
                return _Edit(first, second, when[0]), when[1]
        return None

    def when(self, i: int) -> tuple[str, int] | None:
        """A `when` number with optional space around it and the closing "]": (number, index after "]")."""
        i = _SPACE.match(self.text, i).end()
        number = _NUMBER.match(self.text, i)
        if number is None:
            return None
        end = _SPACE.match(self.text, number.end()).end()
        return (number.group(), end + 1) if self.char(end) == "]" else None


def _walk(node: _Node):
    """Every node of the tree, depth first."""
    yield node
    if isinstance(node, tuple):
        for child in node:
            yield from _walk(child)
    elif isinstance(node, _Edit):
        if node.before is not None:
            yield from _walk(node.before)
        yield from _walk(node.after)
    elif isinstance(node, _Alternate):
        for option in node.options:
            yield from _walk(option)


def _render(node: _Node, step: int, when: dict[str, int]) -> str:
    """The text at `step`: edits show `before` up to and including their step, alternations cycle."""
    if isinstance(node, str):
        return node
    if isinstance(node, _Edit):
        chosen = node.before if step <= when[node.when] else node.after
        return "" if chosen is None else _render(chosen, step, when)
    if isinstance(node, _Alternate):
        return _render(node.options[(step - 1) % len(node.options)], step, when)
    return "".join(_render(child, step, when) for child in node)


def _when_step(number: str, steps: int, hires_steps: int | None) -> int:
    """The step a `when` switches after (A1111's rules; see the module docstring)."""
    int_offset, fraction_offset, total = (0, 0.0, steps) if hires_steps is None else (steps, 1.0, hires_steps)
    value = float(number)
    value = (value - fraction_offset) * total if "." in number else value - int_offset
    try:
        return min(total, int(value))
    except OverflowError:
        raise InvalidInputError(f"prompt editing step {number!r} is out of range") from None


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """(end_step, text) pairs for `prompt` over `steps` model evaluations, as A1111's
    `get_learned_conditioning_prompt_schedules` (`hires_steps`: the evaluations of a hires-fix pass that
    follows `steps` first-pass ones; the schedule then spans the hires pass).

    >>> prompt_schedule("a [fantasy:cyberpunk:16] landscape", 20)
    [(16, 'a fantasy landscape'), (20, 'a cyberpunk landscape')]
    """
    if not isinstance(prompt, str):
        raise InvalidInputError(f"a prompt must be a string, got {type(prompt).__name__}")
    total = steps if hires_steps is None else hires_steps
    tree = _Parser(prompt).document()
    if tree is None:
        return [(total, prompt)]
    ends = {total}
    when: dict[str, int] = {}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            when[node.when] = _when_step(node.when, steps, hires_steps)
            if when[node.when] >= 1:
                ends.add(when[node.when])
        elif isinstance(node, _Alternate):
            ends.update(range(1, total + 1))
    return [(end, _render(tree, end, when)) for end in sorted(ends)]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable prompt: the sub-prompts between `AND`s, each with its trailing ":weight"
    (default 1.0) taken off and trailing space stripped (`get_multicond_prompt_list`).

    >>> split_and("a cat :1.2 AND a dog")
    [('a cat', 1.2), (' a dog', 1.0)]
    """
    if not isinstance(prompt, str):
        raise InvalidInputError(f"a prompt must be a string, got {type(prompt).__name__}")
    parts = []
    for part in _AND.split(prompt):
        text, weight = _SUBPROMPT.match(part).groups()
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


def encode_conditioning(
    tokenizer: CLIPTokenizer,
    text_encoder: nn.Module,
    prompts: list[str],
    negative_prompts: list[str] | None,
    steps: int,
    *,
    hires_steps: int | None = None,
    clip_skip: int = 1,
    zero_empty_negatives: bool = False,
) -> tuple[Conditioning, Conditioning | None]:
    """Float32 conditioning for a batch's prompts and negatives (None: no negative side) over a sampler
    run of `steps` model evaluations (`SamplerInfo.prompt_steps`; `hires_steps` as `prompt_schedule`),
    as A1111's `get_multicond_learned_conditioning` and `get_learned_conditioning`.

    Prompts split on AND into weighted sub-prompts; negatives are read whole (A1111 splits only the
    prompt). Each distinct text is scheduled once and its schedule's texts encoded as one group
    (`encode_prompt_groups`), all groups in one text-encoder call. Where contexts differ in length the
    empty prompt's encoding is the padding between prompt and negative sides. With a text encoder that
    pools (SDXL), each context segment carries its pooled embedding; `zero_empty_negatives` (A1111 on SDXL)
    makes a negative side of only empty prompts all zeros, contexts and pooled embeddings alike.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidInputError("prompts must be a non-empty list of strings")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise InvalidInputError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    subprompts = [split_and(p) for p in prompts]
    texts = list(dict.fromkeys([t for parts in subprompts for t, _ in parts] + list(negative_prompts or [])))
    schedules = [prompt_schedule(t, steps, hires_steps) for t in texts]
    encoded, pooled = encode_prompt_groups(tokenizer, text_encoder, [[t for _, t in s] for s in schedules], clip_skip)
    contexts = {
        text: ScheduledContext(tuple(end for end, _ in schedule), tuple(group.float()),  # (77k, D) each
                               pooled=None if pools is None else tuple(pools.float()))  # (P,) each
        for text, schedule, group, pools in zip(texts, schedules, encoded, pooled)
    }
    padding = None
    if len({group.shape[1] for group in encoded}) > 1:  # A1111's cond_stage_model_empty_prompt
        padding = contexts[""].contexts[0] if "" in contexts else encode_prompt_groups(
            tokenizer, text_encoder, [[""]], clip_skip)[0][0][0].float()
    cond = Conditioning(
        tuple(tuple(dataclasses.replace(contexts[t], weight=w) for t, w in parts) for parts in subprompts),
        padding,
    )
    if negative_prompts is None:
        return cond, None
    negatives = [contexts[t] for t in negative_prompts]
    if zero_empty_negatives and not any(negative_prompts):
        negatives = [_zeros_like(c) for c in negatives]
    return cond, Conditioning(tuple((c,) for c in negatives), padding)


def _zeros_like(scheduled: ScheduledContext) -> ScheduledContext:
    """The same schedule with every context and pooled embedding zero."""
    pooled = None if scheduled.pooled is None else tuple(map(torch.zeros_like, scheduled.pooled))
    return dataclasses.replace(scheduled, contexts=tuple(map(torch.zeros_like, scheduled.contexts)), pooled=pooled)
