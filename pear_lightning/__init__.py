"""pear_lightning: SFT of causal LMs with pluggable per-token weighting strategies (PEAR and friends)."""

from .data import PearDataModule
from .errors import PearError
from .module import PearModule

__version__ = "0.1.0"
__all__ = ["PearDataModule", "PearError", "PearModule", "__version__"]
