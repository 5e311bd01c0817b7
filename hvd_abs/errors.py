"""Exceptions shared across hvd_abs."""
from __future__ import annotations


class UserError(Exception):
    """Bad input that the user must fix; the CLI prints the message and exits 2.

    The message must say how to fix the input (which flag or path), not only what is wrong.
    """
