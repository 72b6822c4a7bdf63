"""Patterns, their exact masks, and spec files."""
