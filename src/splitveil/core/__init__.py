"""Errors, the generic registry, seeding and thread set-up shared by every layer of splitveil."""
