"""Tokenisation: a pretrained `transformers` tokenizer, or a WordPiece one built offline from the
training expressions (the default, since nothing can be downloaded). Both end up as a
`PreTrainedTokenizerFast` saved with `save_pretrained`, so later stages load either the same way."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np

# transformers costs seconds to import; stages that only need TOKENIZER_DIR skip it
if TYPE_CHECKING:
    from transformers import BertTokenizerFast, PreTrainedTokenizerBase

TOKENIZER_DIR = "tokenizer"  # where a prepared dataset and a checkpoint folder keep their tokenizer
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(expressions: Iterable[str], vocab_size: int) -> BertTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer for `expressions` (training split only, so val/test
    words it never saw map to pieces or [UNK] exactly as a real pretrained vocabulary would).

    The vocabulary is built here rather than by `tokenizers`' WordPiece trainer, because the trainer
    breaks ties between merges in hash-map order, which changes from process to process: every
    `prepare` gave the same words other ids (other embeddings, other results, another DVC hash).
    Here it is a function of the
    expressions: the special tokens, every character seen (word-initial and `##` continuation, so
    any word can be spelt), then whole words by frequency (ties alphabetical) up to `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer, pre_tokenizer = (
        normalizers.BertNormalizer(lowercase=True),
        pre_tokenizers.BertPreTokenizer(),
    )
    counts = Counter(
        word
        for e in expressions
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(e))
    )
    chars = sorted({c for word in counts for c in word})
    base = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    if len(base) > vocab_size:
        raise ValueError(
            f"model.text.vocab_size {vocab_size} cannot hold the "
            f"{len(base)} special tokens and "
            f"characters of the training expressions"
        )
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab = base + words[: vocab_size - len(base)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)


def get_tokenizer(
    out_dir: Path, pretrained: Optional[str], train_expressions: Iterable[str], vocab_size: int
) -> PreTrainedTokenizerBase:
    """Build (or load the pretrained) tokenizer and save it to `out_dir` for the later stages."""
    from transformers import AutoTokenizer

    if pretrained:
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
    else:
        tokenizer = build_wordpiece_tokenizer(train_expressions, vocab_size)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode(
    tokenizer: PreTrainedTokenizerBase, expressions: list[str], max_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids, attention_mask), int32 [N, max_tokens], padded and truncated."""
    enc = tokenizer(
        expressions,
        padding="max_length",
        truncation=True,
        max_length=max_tokens,
        return_tensors="np",
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
