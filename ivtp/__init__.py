"""IVTP: instruction-guided visual token pruning for LLaVA-1.5."""

from ivtp.config import ConfigError, PruneConfig
from ivtp.patch.llava import apply_pruning, load_pruned

__version__ = "0.1.0"
__all__ = ["PruneConfig", "ConfigError", "apply_pruning", "load_pruned", "__version__"]
