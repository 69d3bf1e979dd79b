"""Exceptions raised by outbox-bridge."""


class OutboxBridgeError(Exception):
    """Base class of outbox-bridge's own errors."""


class InvalidMessage(OutboxBridgeError, ValueError):
    """A message given to publish() or send() cannot be written as it is."""


class InvalidTopic(InvalidMessage):
    """The topic name is empty or not a legal Kafka topic name."""


class InvalidHeaders(InvalidMessage):
    """A header name or value has the wrong type or cannot be carried (NUL, lone surrogates)."""


class NotSerializable(InvalidMessage):
    """The value cannot be serialized (not JSON-serializable, by default)."""


class MessageTooLarge(InvalidMessage):
    """Value, key and headers together exceed ``outbox_bridge_max_message_bytes``."""


class InvalidTime(InvalidMessage):
    """``deliver_at``, ``delay``, ``expires_at`` or ``ttl`` cannot be used as given (a
    naive datetime, a time in the past, a negative delay, an expiry before delivery)."""


class NoReplyTo(InvalidMessage):
    """``message.reply()`` on a message that was not published with ``reply_to``."""


class DecodeError(OutboxBridgeError, ValueError):
    """A consumed value cannot be decoded by the handler's serializer."""


class DeliveryFailed(OutboxBridgeError):
    """Kafka refused some messages on their own; the retry task retries them."""


class InvalidKey(InvalidMessage):
    """The key is not str, bytes or None, or longer than outbox-bridge can keep in order."""


class TransientError(OutboxBridgeError):
    """A database error after which the same work may succeed; tasks retry it."""


class NotInTransaction(OutboxBridgeError):
    """``publish()`` was given a connection with no transaction open (autocommit):
    the message would commit on its own, apart from the caller's writes."""


class SchemaTooOld(OutboxBridgeError):
    """The database lacks migrations this version needs (``outbox-bridge migrate``)."""
