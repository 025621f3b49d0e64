"""The split-diffusion math: the scheduler, the split contract, the secret cut noise, counter noise, the U-Nets."""
