"""ami: the Linky key hierarchy as a running, attackable system.

Layers, lowest first (tests/test_layers.py enforces the import directions):

* ``ami.protocol``: the sans-I/O core (frames, keys, counters, messages, topics);
* ``ami.machines``: the sans-I/O state machines of the meter and the head-end;
* ``ami.security``: key vaults, bus identities and ACLs, broker/TLS files;
* ``ami.runtime``: what every running service shares (bus, config, logs,
  metrics, service runner, sharding, network files);
* ``ami.broker``: the embedded amqtt broker;
* the services ``headend``, ``meters``, ``concentrator`` (thin async shells,
  top-level packages), which never import each other nor the tools;
* ``ami.tools``: end-user commands (provision, operator commands, monitor,
  tsp, attack, loadtest, config), on public APIs only;
* ``ami.cli``: the ``ami`` command, which imports a subcommand only when it runs.
"""
