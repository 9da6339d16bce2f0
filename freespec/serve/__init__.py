"""The OpenAI-compatible HTTP server: app, scheduler, metrics, text streaming."""

# here, not in the scheduler, so that the command line shows it without importing torch
DEFAULT_PREFIX_CACHE_MB = 512  # about 11,000 prompt tokens of SmolLM2-135M (46 KB a row)
DEFAULT_MAX_BATCH = 16  # requests on the model at once, their steps batched into one forward pass
DEFAULT_STATE_INTERVAL = 300.0  # seconds between saves of `serve --state` while requests end
