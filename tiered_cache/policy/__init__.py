"""Pure policy: keys, expiry, validation and encoding. No I/O here; the clock is injected."""
