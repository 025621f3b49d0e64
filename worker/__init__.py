"""The worker: the shared server model, batched across every client's training and denoising."""
