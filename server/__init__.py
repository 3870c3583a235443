"""Rill: a small, fast, trustworthy relay that streams model answers to browsers over SSE."""

__version__ = "0.1.0"
