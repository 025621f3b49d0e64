"""Shared helpers every layer may use: the typed settings, clean shutdown, progress lines, energy."""
