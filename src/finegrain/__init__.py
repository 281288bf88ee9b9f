"""finegrain: fine-grained image recognition and retrieval."""

__version__ = "0.1.0"
