"""The error every model-loading failure the user can fix becomes (one line; the CLI exits 2)."""


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message names the file (and the tensor) and says what to do."""
