"""Prompt text copied verbatim from peers (see each file's header for the source and licence)."""
