"""Offline data sets, with one clear line and an install hint when one is missing."""
