# Generated from tiered_cache/_async/__init__.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""Hand-written async source; tools/async_to_sync.py generates tiered_cache/_sync/ from it."""
