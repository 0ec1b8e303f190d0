"""The sans-I/O state machines of the meter and the head-end.

Like ami.protocol, nothing here does I/O, reads a clock or draws randomness
of its own: the async shells (``meters/``, ``headend/``) hand in bytes, the
time and a key generator, and carry out what comes back (frames to send,
rows to commit, timers to arm).  tests/protocol/test_no_io.py guards it.

* ``meter``: one virtual meter (association, key transfer, counters, gap-fill);
* ``loadcurve``: the closed-form load curve a meter reports and regenerates;
* ``headend``: the head-end engine for every meter (sessions, gap-fill, key
  lifecycle, campaigns), with ``headend_state`` (its in-memory state) and
  ``headend_records`` (the rows it hands to a store and loads back).
"""
