"""Presentation: rich tables and text for the commands (the cores return data)."""
