"""whq capture: sites, on-device reductions, sources, the ingest pipeline.

torch and transformers are imported lazily, inside the functions that need them.
"""
