"""Data: scanning, splitting, decoding and demo data."""
