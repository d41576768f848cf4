"""How a stock transformers LLaVA is changed: class swaps that override forward only."""
