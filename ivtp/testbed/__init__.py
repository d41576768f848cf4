"""The testbed: a CPU-trainable miniature of LLaVA-1.5 with IVTP (data, a tiny CLIP, a small LLM, evals)."""
