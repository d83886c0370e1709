"""The one error type for bad input data: the message names the file (and line) at fault."""


class DatasetError(ValueError):
    """A dataset or corpus on disk is missing a file or holds a malformed one."""
