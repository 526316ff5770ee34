"""Protobuf messages as JSON-ready data, the one form every JSON output of the project
uses (`mlx-cluster ... --json`, the HTTP API's /v1/cluster): field names as in the proto,
fields at their defaults included, 64-bit integers as numbers (proto3 JSON would make
them strings)."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict

_WIDE = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def to_dict(message) -> dict:
    """A message as JSON-ready data, 64-bit integers as numbers."""
    data = MessageToDict(message, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)
    _int64_as_numbers(message.DESCRIPTOR, data)
    return data


def _int64_as_numbers(descriptor, data: dict) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        repeated = isinstance(value, list)
        if field.message_type is not None:
            for item in value if repeated else [value]:
                _int64_as_numbers(field.message_type, item)
        elif field.cpp_type in _WIDE:
            data[field.name] = [int(v) for v in value] if repeated else int(value)
