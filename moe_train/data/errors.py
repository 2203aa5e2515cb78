"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem; the message is one line naming the file, directory or domain at fault."""
