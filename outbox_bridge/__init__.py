"""outbox-bridge: a transactional outbox and inbox for PostgreSQL, Kafka and Celery.

``publish`` writes a message in your transaction; ``celery -A outbox_bridge
worker`` delivers it to Kafka.
"""

from .errors import (
    DecodeError,
    DeliveryFailed,
    InvalidHeaders,
    InvalidKey,
    InvalidMessage,
    InvalidTime,
    InvalidTopic,
    MessageTooLarge,
    NoReplyTo,
    NotInTransaction,
    NotSerializable,
    SchemaTooOld,
)
from .message import Message
from .outbox.publish import publish, publish_async, send

__all__ = [
    "DecodeError",
    "DeliveryFailed",
    "InvalidHeaders",
    "InvalidKey",
    "InvalidMessage",
    "InvalidTime",
    "InvalidTopic",
    "Message",
    "MessageTooLarge",
    "NoReplyTo",
    "NotInTransaction",
    "NotSerializable",
    "SchemaTooOld",
    "app",
    "outbox_handler",
    "publish",
    "publish_async",
    "send",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Resolved on use, so that publishing (a web process) never builds the worker's
    # Celery app nor reads celeryconfig: ``celery -A outbox_bridge`` asks for ``app``.
    if name == "app":
        from .worker.app import app

        return app
    if name == "outbox_handler":
        from .inbox.handlers import outbox_handler

        return outbox_handler
    raise AttributeError(f"module 'outbox_bridge' has no attribute {name!r}")
