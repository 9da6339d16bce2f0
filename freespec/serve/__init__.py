"""The OpenAI-compatible HTTP server: app, scheduler, metrics, text streaming."""

# here, not in the scheduler, so that the command line shows it without importing torch
DEFAULT_PREFIX_CACHE_MB = 512  # about 11,000 prompt tokens of SmolLM2-135M (46 KB a row)
