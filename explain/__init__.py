"""Explanations and scores: every unit explained by a language model, scored on held-out examples.

Uses `warehouse` (storage, commit) and the macros in `queries/`; neither imports it. Heavy
imports (torch, transformers) are lazy: torch only in the hf backend and the MiniLM embedder.
See docs/explain.md.
"""
