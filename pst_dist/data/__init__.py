"""Data sources (uint8 splits) and the in-memory batch loader."""
