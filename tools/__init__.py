"""Whole-system tools: the in-process simulation, image grids, progress display."""
