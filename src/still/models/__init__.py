"""Registered model factories (vision, text, language models)."""
