"""The edge node: a client's private data, its local model and its side of the split."""
