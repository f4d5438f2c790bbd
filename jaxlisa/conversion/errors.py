"""The converter's error type (its own file so that every conversion module, checkpoint_io and
the .gguf reader alike, can raise it without importing each other)."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the model it is converted into."""
