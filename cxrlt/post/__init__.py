"""After training: classifier re-training (the head stage), TTA inference and post-processing."""
