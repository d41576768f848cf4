"""Build the small Llama-style tokenizer shipped in ivtp/assets/tiny-tokenizer (used by the tiny-random preset).

It is a SentencePiece-style BPE (the "\u2581" word marker, as Llama's tokenizer) trained with `tokenizers` on a
small English word list, with LLaVA's special tokens. Re-running this script reproduces the shipped files.

    python scripts/make_tiny_tokenizer.py [OUT_DIR]
"""

import itertools
import os
import string
import sys

from tokenizers import SentencePieceBPETokenizer, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
WORDS = """a an the is are was were be this that these those what which who where when why how many much
there here it its of in on at to from with without by for and or not no yes left right top bottom middle
center above below next behind front image picture photo object objects shape shapes colour color colours
red green blue yellow purple orange black white gray grey pink brown circle square triangle star cross
small large big tiny round one two three four five six seven eight nine ten count number describe detail
question answer user assistant chat between curious human artificial intelligence gives helpful detailed
polite answers human's questions please short word single phrase using provided options letter correct""".split()


def corpus():
    for a, b in itertools.product(WORDS, repeat=2):
        yield f"{a} {b}"
        yield f"{a.capitalize()} {b}?"
    yield " ".join(WORDS)


def main(out_dir: str) -> None:
    tok = SentencePieceBPETokenizer(unk_token="<unk>", add_prefix_space=True)
    # Every printable ASCII character (and newline) is in the alphabet, so no ASCII text maps to <unk>.
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c"))
    tok.train_from_iterator(
        corpus(), vocab_size=640, min_frequency=2, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    print(f"wrote {out_dir}: vocab {len(fast)}")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "ivtp", "assets", "tiny-tokenizer"))
