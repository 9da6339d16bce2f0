"""The target model: loading, weight formats, the KV cache and the forward pass."""
