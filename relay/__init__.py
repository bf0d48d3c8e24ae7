"""relay: the Anthropic Messages API in front of any model."""

__version__ = "0.1.0"
