"""``ami read METER``: an on-demand read through the head-end (see ami.operator)."""

from .operator import add_read_arguments as add_arguments
from .operator import read_main as main

__all__ = ["add_arguments", "main"]
