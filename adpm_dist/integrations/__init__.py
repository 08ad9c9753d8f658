"""Bridges to other ecosystems (diffusers)."""
