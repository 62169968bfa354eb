"""Hand-written async source; tools/async_to_sync.py generates tiered_cache/_sync/ from it."""
