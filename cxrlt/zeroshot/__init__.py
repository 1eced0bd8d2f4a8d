"""Task 2: zero-shot scoring with CLIP-style models."""
