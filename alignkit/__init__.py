"""alignkit: post-train language models with feedback."""

__version__ = "0.1.0"
