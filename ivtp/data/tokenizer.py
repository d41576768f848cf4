"""Small Llama-style tokenizers trained with `tokenizers`: the tiny test tokenizer (scripts/make_tiny_tokenizer.py)
and the testbed's (ivtp/testbed), both SentencePiece-style BPE with the "\u2581" word marker, as Llama's."""

from __future__ import annotations

import os
import string
from typing import Iterable

SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]  # ids 0-4; <s> is 1 as in Llama


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int, min_frequency: int = 2,
                    split_punctuation: bool = True):
    """Train on `texts`, save a fast tokenizer with LLaVA's special tokens to `out_dir`, and return it.
    Every printable ASCII character is in the alphabet, so no ASCII text maps to <unk>. `split_punctuation` keeps
    punctuation and newlines out of word tokens, as Llama's tokenizer does (the shipped tiny tokenizer predates it)."""
    from tokenizers import SentencePieceBPETokenizer, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = SentencePieceBPETokenizer(unk_token="<unk>", add_prefix_space=True)
    if split_punctuation:
        # Llama's SentencePiece splits by character class, so "square?" is "\u2581square" then "?". The Metaspace
        # pre-tokenizer alone splits at spaces only: the testbed's BPE then learnt "\u2581square?\nAnswer" (the
        # question's last word merged with the answer-format suffix), one token that no word-level relevance can
        # single out (IVTP's guidance rates instruction words).
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            tok.pre_tokenizer, pre_tokenizers.Punctuation("isolated"), pre_tokenizers.Split("\n", "isolated")])
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
