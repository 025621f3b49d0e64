"""CollaFuse: collaborative split diffusion between edge nodes and a shared server."""

__version__ = "0.1.0"
