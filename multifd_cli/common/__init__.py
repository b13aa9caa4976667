"""Pieces both sides use, below send/ and recv/: page tables, filesystem calls, progress display."""
