"""Names and paths the CLI parser needs, importable without torch or transformers (`ivtp --help` stays fast).

The modules that use them import them from here; nothing here is defined twice."""

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TINY_TOKENIZER = os.path.join(ASSETS, "tiny-tokenizer")
# The testbed's trained LLaVA (docs/testbed.md), shipped in the package: `ivtp demo`'s default model.
TESTBED_MODEL = os.path.join(ASSETS, "testbed", "llava-ivtp")

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # torch dtypes by name (ivtp.models.DTYPES)
PRESET_NAMES = ("tiny-random", "cpu-mid", "llava-1.5-7b", "llava-1.5-13b", "tiny-random-next", "cpu-mid-next",
                "llava-1.6-7b", "llava-1.6-13b")  # ivtp.models.PRESETS, in order
MODEL_ALIASES = ("testbed",)  # names load_model resolves besides the presets

SUITES = ("methods", "group", "tau", "aggregation", "guidance", "stages", "extensions", "tau_extended")  # ivtp ablate
DEFAULT_BUDGETS = (4, 7, 14)  # ivtp ablate: final visual tokens per image on the testbed's 64 patches
ALLOCATORS = ("steady", "default")  # ivtp bench --allocator
ON_BAD_IMAGE = ("stop", "skip")  # ivtp eval --on-bad-image (ivtp.eval.runner.run_chunk)
# LLaVA's own projector and the trained compressors that may replace it (ivtp.projectors.PROJECTORS).
PROJECTOR_NAMES = ("mlp", "honeybee", "llama_vid", "qwen_vl")
# A checkpoint folder may carry the aligner its stage 2 was trained with (the testbed's and train/*.py's do): the
# weights, and a JSON naming the open_clip model config they fit (ivtp.aligner.Aligner.save_pretrained).
ALIGNER_FILE, ALIGNER_META = "aligner.safetensors", "aligner.json"
