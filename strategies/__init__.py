"""Built-in weighting strategies, and the contract third-party strategies implement."""

from .base import TokenBatch, WeightingStrategy
from .dft import DFT
from .importance import BlockIS, ImportanceSampling, SequenceIS, TokenIS
from .truncated import TruncatedIS
from .uniform import UniformSFT

__all__ = [
    "DFT",
    "BlockIS",
    "ImportanceSampling",
    "SequenceIS",
    "TokenBatch",
    "TokenIS",
    "TruncatedIS",
    "UniformSFT",
    "WeightingStrategy",
]
