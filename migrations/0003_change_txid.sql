-- Which transaction made each change. A writer that stored its own new state in Redis marks the
-- entry with its transaction id; the relay then skips the kill for that same change instead of
-- throwing the fresh entry away (any other transaction's change still kills it).
ALTER TABLE biz.ai_cache_changes
    ADD COLUMN IF NOT EXISTS txid xid8 DEFAULT pg_current_xact_id();
