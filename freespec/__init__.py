"""freespec: lossless, training-free speculative decoding for Hugging Face causal LMs."""

from freespec.api import GenerationResult, Model, load
from freespec.engine import GenerationStats

__all__ = ["GenerationResult", "GenerationStats", "Model", "load"]
__version__ = "0.1.0"
