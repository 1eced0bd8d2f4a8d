"""The training loop, its run folder, distributed setup and devices."""
