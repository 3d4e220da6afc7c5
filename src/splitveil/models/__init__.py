"""Model loading and the Splittable contract with its adapters."""
