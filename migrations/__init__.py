"""Plain SQL migrations, applied in file-name order by tiered_cache.migrate(); installed as tiered_cache.migrations."""
