"""The split-diffusion core: schedule, noising, losses, samplers, models, checkpoints."""
