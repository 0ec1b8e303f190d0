"""Tests of the sans-I/O protocol core (ami/protocol)."""
