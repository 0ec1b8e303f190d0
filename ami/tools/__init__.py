"""End-user tools behind ``ami``: provisioning, operator commands, the
monitor dashboard, the handheld (tsp), ``ami attack``, ``ami loadtest`` and
``ami config``.  They use the public APIs of the layers below, like any user
of the package would."""
