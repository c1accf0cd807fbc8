"""charrnn: character-level LSTM text generation; Ray Train on CPU/GPU, checkpoints in local or
S3-compatible storage, Ray Serve batched generation. Modules are imported where they are used:
importing the package loads nothing (no torch, no Ray)."""
