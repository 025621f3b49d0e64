"""The wire protocol (PROTOCOL.md): a msgpack envelope frame, then at most one safetensors frame.

Torch-free: the broker imports this package and nothing heavier.
"""
