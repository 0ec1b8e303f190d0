"""What every service shares while it runs: the bus connection (``bus``) and
its reconnecting link, configuration (``config``), logging (``logs``), the
metrics and status publisher (``metrics``), the service runner and common
command-line options (``service``), segment sharding (``sharding``), the
provisioned network's files (``network``) and the one-thread SQLite helper
(``single_thread``)."""
