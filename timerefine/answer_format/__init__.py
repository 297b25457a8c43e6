"""The model's output format: timeline, refinement targets, answer text, token codec, parsing."""
