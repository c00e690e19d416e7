"""Esper: neural networks that grow, under an event-sourced seed lifecycle."""

__version__ = "0.1.0"
