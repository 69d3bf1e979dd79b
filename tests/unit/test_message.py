"""Input checks of publish(): each kind of bad input names its problem."""

import uuid

import pytest

from outbox_bridge.errors import InvalidHeaders, InvalidKey, InvalidTopic, NotSerializable
from outbox_bridge.message import (
    JSONSerializer,
    check_topic,
    encode_headers,
    encode_key,
    kafka_headers,
)


@pytest.mark.parametrize("topic", ["", None, 7, ".", "..", "has space", "x" * 250, "ü"])
def test_illegal_topics_are_refused(topic):
    with pytest.raises(InvalidTopic) as exc:
        check_topic(topic)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("topic", ["orders", "a.b-c_d", "x" * 249])
def test_legal_topics_pass(topic):
    assert check_topic(topic) == topic


def test_json_serializer_and_bytes_passthrough():
    s = JSONSerializer()
    assert s.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    assert s.dumps(b"\x00raw") == b"\x00raw"
    with pytest.raises(NotSerializable, match="object is not JSON-serializable"):
        s.dumps(object())
    with pytest.raises(NotSerializable, match="set"):
        s.dumps({1, 2})


def test_headers_round_trip_and_message_id_first():
    stored = encode_headers({"type": "A", "raw": b"\x01", "none": None})
    message_id = uuid.uuid4()
    assert kafka_headers(stored, message_id) == [
        ("message_id", str(message_id).encode()),
        ("type", b"A"),
        ("raw", b"\x01"),
        ("none", None),
    ]


@pytest.mark.parametrize(
    "headers, problem",
    [
        ({1: "x"}, "header names must be non-empty strings"),
        ({"": "x"}, "header names must be non-empty strings"),
        ({"n": 5}, "header 'n' must be str, bytes or None"),
        ([("a",)], "mapping or (name, value) pairs"),
        ({"message_id": "x"}, "is set by outbox-bridge"),
    ],
)
def test_bad_headers_name_the_problem(headers, problem):
    with pytest.raises(InvalidHeaders) as exc:
        encode_headers(headers)
    assert problem in str(exc.value)


def test_keys():
    assert encode_key("k") == b"k"
    assert encode_key(b"k") == b"k"
    assert encode_key(None) is None
    with pytest.raises(InvalidKey, match="key must be"):
        encode_key(5)
    assert encode_key(b"k" * 2000) == b"k" * 2000
    with pytest.raises(InvalidKey, match="2001 bytes"):
        encode_key(b"k" * 2001)
    with pytest.raises(InvalidKey, match="not valid Unicode"):
        encode_key("\ud800")


@pytest.mark.parametrize(
    "headers, problem",
    [
        ({"a\x00b": "v"}, "contains NUL"),
        ({"\udc80": "v"}, "not valid Unicode"),
        ({"n": "\ud800"}, "not valid Unicode"),
    ],
)
def test_headers_that_kafka_or_postgresql_cannot_carry_are_refused(headers, problem):
    with pytest.raises(InvalidHeaders, match=problem):
        encode_headers(headers)


def test_a_nul_in_a_header_value_is_carried_byte_for_byte():
    stored = encode_headers({"n": "a\x00b"})
    assert kafka_headers(stored, "id")[1] == ("n", b"a\x00b")


@pytest.mark.parametrize("value", [float("nan"), {"x": float("inf")}, "\ud800"])
def test_values_that_are_not_json_are_refused(value):
    with pytest.raises(NotSerializable):
        JSONSerializer().dumps(value)


def test_headers_from_kafka_are_stored_as_text_when_they_can_be_and_come_back_as_bytes():
    from outbox_bridge.message import as_stored, decode_stored

    pairs = [("a", b"text"), ("b", b"\xff\x00bin"), ("c", b"nul\x00inside"), ("d", None)]
    stored = [[name, as_stored(value)] for name, value in pairs]
    assert stored[0][1] == "text" and stored[3][1] is None
    assert isinstance(stored[1][1], dict) and isinstance(stored[2][1], dict)  # base64
    assert decode_stored(stored) == pairs
