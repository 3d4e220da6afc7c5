"""splitveil: privacy-preserving split inference, measured with real attacks.

Importing the package is cheap: torch and transformers are imported by the modules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
