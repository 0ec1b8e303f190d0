"""The embedded MQTT broker (amqtt) with the bus ACL enforced: ``server``
(broker, settings, amqtt fixes), ``plugins`` (ACL and Will checks) and
``cli`` (``ami broker``)."""
