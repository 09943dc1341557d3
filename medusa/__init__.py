"""medusa: faster decoding for any Hugging Face causal LM with Medusa heads."""
from medusa.model import MedusaModel

__all__ = ["MedusaModel"]
__version__ = "0.1.0"
