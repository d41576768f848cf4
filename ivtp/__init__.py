"""IVTP: instruction-guided visual token pruning for LLaVA-1.5."""

from ivtp.config import ConfigError, PruneConfig

__version__ = "0.1.0"
__all__ = ["PruneConfig", "ConfigError", "apply_pruning", "load_pruned", "__version__"]


def __getattr__(name: str):
    # apply_pruning and load_pruned import torch and transformers: only when asked for, so that `ivtp --help`
    # and the config tools start in a fraction of a second.
    if name in ("apply_pruning", "load_pruned"):
        from ivtp.patch import llava

        return getattr(llava, name)
    raise AttributeError(f"module 'ivtp' has no attribute {name!r}")
