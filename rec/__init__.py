"""Nightly reinforcement-learning recommendations for an on-demand expert-consulting app."""

__version__ = "0.1.0"
