"""A1111's `<lora:name:weight>` prompt tags are cut out of the conditioning text and read as A1111 reads them."""

import pytest

from sdtorch.errors import InvalidInputError
from sdtorch.extra_networks import ExtraNetwork, strip_extra_networks


@pytest.mark.parametrize("prompt, text, tags", [
    ("a cat", "a cat", []),
    ("a cat <lora:ink:0.7>, sketch", "a cat , sketch", [ExtraNetwork("lora", "ink", ("0.7",))]),
    ("<lora:a:1><lora:b>x", "x", [ExtraNetwork("lora", "a", ("1",)), ExtraNetwork("lora", "b", ())]),
    ("<hypernet:h:0.5:2> y", " y", [ExtraNetwork("hypernet", "h", ("0.5", "2"))]),
    ("<lora:my lora v2:0.5>", "", [ExtraNetwork("lora", "my lora v2", ("0.5",))]),
    ("(a <b>) <:x> <lora:>", "(a <b>) <:x> <lora:>", []),  # not tags: no kind, or nothing after the colon
])
def test_tags_are_cut_out(prompt, text, tags):
    assert strip_extra_networks(prompt) == (text, tags)


def test_weights():
    assert [t.weight for t in strip_extra_networks("<lora:a><lora:b:0.25><lora:c::2>")[1]] == [1.0, 0.25, 1.0]
    for bad in ("<lora:a:x>", "<lora:a:nan>"):
        with pytest.raises(InvalidInputError, match="<lora:a:"):
            strip_extra_networks(bad)[1][0].weight
