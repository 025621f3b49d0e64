"""The shared engine both sides run: the two parties, the continuous-batching sampler, CUDA graphs,
checkpoints, and the in-process run of the whole system."""
