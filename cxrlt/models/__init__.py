"""The network (backbone + heads), the losses and the checkpoint format."""
