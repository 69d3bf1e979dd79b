"""Django integration: add ``"outbox_bridge.contrib.django"`` to ``INSTALLED_APPS``.

``manage.py migrate`` then creates outbox-bridge's schema with the same
versioned SQL as ``outbox-bridge migrate`` (either may run; each version is
applied once), ``publish(connection, ...)`` works inside
``transaction.atomic()``, and settings are read from Django settings named
like the environment variables (``OUTBOX_BRIDGE_SCHEMA = "events"``). The
database defaults to the ``DATABASES`` entry named by ``OUTBOX_BRIDGE_DATABASE``
(``"default"``).
"""
