"""Small Llama-style tokenizers trained with `tokenizers`: the tiny test tokenizer (scripts/make_tiny_tokenizer.py)
and the testbed's (ivtp/testbed), both SentencePiece-style BPE with the "\u2581" word marker, as Llama's."""

from __future__ import annotations

import os
import string
from typing import Iterable

SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]  # ids 0-4; <s> is 1 as in Llama


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int, min_frequency: int = 2):
    """Train on `texts`, save a fast tokenizer with LLaVA's special tokens to `out_dir`, and return it.
    Every printable ASCII character is in the alphabet, so no ASCII text maps to <unk>."""
    from tokenizers import SentencePieceBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = SentencePieceBPETokenizer(unk_token="<unk>", add_prefix_space=True)
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c"))
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                            initial_alphabet=alphabet, show_progress=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
