"""Built-in weighting strategies, and the contract third-party strategies implement."""

from .base import TokenBatch, WeightingStrategy
from .uniform import UniformSFT

__all__ = ["TokenBatch", "UniformSFT", "WeightingStrategy"]
