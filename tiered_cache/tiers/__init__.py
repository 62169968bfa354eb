"""The tiers, top to bottom: near (in-process), redis (front), postgres (system of record)."""
