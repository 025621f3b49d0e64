"""Measuring the paper's trade-offs: image fidelity (KID), disclosed information, energy."""
