"""The command lines: `collafuse` (main.py) and `collafuse-node` (node.py)."""
