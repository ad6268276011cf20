"""Helpers used only by the tests (not shipped)."""
