"""Training loops for vision models (protections will plug their loss terms in here)."""
