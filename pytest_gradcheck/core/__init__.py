"""The pure core: plain-data profiles, bounds, checks, diagnosis and baselines. Never imports torch."""
