"""The offline tokenizer: the same expressions give the same vocabulary and ids in every process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from refvg.data.text import build_wordpiece_tokenizer
from tests.helpers import ROOT

EXPRESSIONS = [
    "The red circle, left of the blue square.",
    "a big red box",
    "the small green triangle on top",
    "second circle from the left",
    "blue square below the red box",
]
BUILD = (
    "import sys; from refvg.data.text import build_wordpiece_tokenizer as b; "
    f"sys.stdout.write(b({EXPRESSIONS!r}, 120).backend_tokenizer.to_str())"
)


def test_vocabulary_is_the_same_in_every_process():
    # Hash-map order differs per process (it is what made tokenizers' trainer nondeterministic), so
    # compare tokenizers built by separate interpreters, byte for byte.
    built = {
        subprocess.run(
            [sys.executable, "-c", BUILD], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        for _ in range(3)
    }
    assert len(built) == 1


def test_words_pieces_and_specials():
    tok = build_wordpiece_tokenizer(EXPRESSIONS, 120)
    assert tok.tokenize("the red circles") == [
        "the",
        "red",
        "circle",
        "##s",
    ]  # an unseen word is spelt out
    assert tok.tokenize("zebra") == ["[UNK]"]  # 'z' never occurs in the expressions
    ids = tok("red box")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) == 4
    assert tok.pad_token_id == 0 and tok.mask_token_id == 4


def test_vocab_size_caps_the_words_and_must_hold_the_characters():
    small = build_wordpiece_tokenizer(EXPRESSIONS, 53)  # 51 specials and characters, then 2 words
    words = [t for t in small.get_vocab() if len(t) > 1 and not t.startswith(("##", "["))]
    assert len(small) == 53 and sorted(words) == [
        "red",
        "the",
    ]  # the most frequent words are kept first
    assert small.tokenize("triangle")[:2] == ["t", "##r"]
    with pytest.raises(ValueError, match="vocab_size 20 cannot hold"):
        build_wordpiece_tokenizer(EXPRESSIONS, 20)
