"""User-facing errors: the command line prints their message and exits non-zero, without a traceback."""


class MiniVLMError(Exception):
    """Base class for errors caused by the user's input (files, arguments), not by a bug."""


class DataFormatError(MiniVLMError):
    """A data file is missing, unreadable or does not follow its format; the message names file and field."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class ImageError(MiniVLMError):
    """An image cannot be opened or decoded."""
