"""The OpenAI-compatible HTTP server: app, scheduler, metrics, text streaming."""
