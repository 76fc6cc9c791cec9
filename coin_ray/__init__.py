"""coin-ray: adapt a cloud object detector to your own image domain (COIN, NeurIPS 2024)."""

__version__ = "0.1.0"
