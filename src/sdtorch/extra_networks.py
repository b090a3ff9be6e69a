"""A1111's extra networks in prompts: `<lora:name:0.8>` (and `<kind:name:args...>` in general).

    strip_extra_networks("a cat <lora:ink:0.7>, sketch") -> ("a cat , sketch", [ExtraNetwork("lora", "ink", ("0.7",))])

As A1111's `extra_networks.parse_prompt`, the tags are cut out of the text the model is conditioned on; the
infotext keeps the prompt as written. A LoRA's first argument is its weight (default 1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import InvalidInputError

_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:name:args...>` tag of a prompt."""

    kind: str
    name: str
    args: tuple[str, ...] = ()

    @property
    def weight(self) -> float:
        """The first argument as a number (A1111's multiplier), 1 when absent."""
        if not self.args or self.args[0] == "":
            return 1.0
        try:
            weight = float(self.args[0])
        except ValueError:
            raise InvalidInputError(f"<{self.kind}:{self.name}:{self.args[0]}>: the weight is not a number") from None
        if not math.isfinite(weight):
            raise InvalidInputError(f"<{self.kind}:{self.name}:{self.args[0]}>: the weight must be finite")
        return weight


def strip_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """The prompt without its extra-network tags, and the tags in order."""
    found: list[ExtraNetwork] = []

    def cut(match: re.Match) -> str:
        name, *args = match.group(2).split(":")
        found.append(ExtraNetwork(match.group(1), name, tuple(args)))
        return ""

    return _TAG.sub(cut, prompt), found
