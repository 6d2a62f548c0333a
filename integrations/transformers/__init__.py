"""Hugging Face transformers adapter (imported lazily; needs the `transformers` extra)."""
