"""Build the small Llama-style tokenizer shipped in ivtp/assets/tiny-tokenizer (used by the tiny-random preset).

It is a SentencePiece-style BPE (the "\u2581" word marker, as Llama's tokenizer) trained with `tokenizers` on a
small English word list, with LLaVA's special tokens. Re-running this script reproduces the shipped files.

    python scripts/make_tiny_tokenizer.py [OUT_DIR]
"""

import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ivtp.data.tokenizer import train_tokenizer  # noqa: E402

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
    fast = train_tokenizer(corpus(), out_dir, vocab_size=640)
    print(f"wrote {out_dir}: vocab {len(fast)}")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "ivtp", "assets", "tiny-tokenizer"))
