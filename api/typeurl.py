"""`google.protobuf.Any` the way containerd resolves it.

containerd 1.6 looks a type up by the bare full name in `type_url`
(`containerd.events.TaskExit`); protobuf's `Any.Pack()` writes
`type.googleapis.com/containerd.events.TaskExit`, which containerd 1.6 cannot resolve.
`pack()` writes the bare name; `unpack()` reads either form.

containerd also puts JSON documents in an Any (an exec's OCI process, Update's
resources) under URLs like `types.containerd.io/opencontainers/runtime-spec/1/Process`:
`unpack_json()` reads those.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from typing import Any as AnyType

from google.protobuf import any_pb2, descriptor_pool, message_factory

OCI_PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
OCI_LINUX_RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


class UnknownTypeError(LookupError):
    """An Any's type_url names no message this process knows."""


def pack(message: AnyType) -> any_pb2.Any:
    """An Any holding `message`, its type_url the message's bare full name."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def type_name(any_message: any_pb2.Any) -> str:
    """The full message name an Any's type_url names (any `host/` prefix removed)."""
    return any_message.type_url.rpartition("/")[2]


def unpack(any_message: any_pb2.Any) -> AnyType:
    """The message inside an Any, as an instance of its generated class.

    Raises `UnknownTypeError` for a type no generated module declares, and
    `google.protobuf.message.DecodeError` for a value that does not parse.
    """
    name = type_name(any_message)
    if not name:
        raise UnknownTypeError(f"Any has no type_url (type_url={any_message.type_url!r})")
    cls = _message_class(name)
    return cls.FromString(any_message.value)


def pack_json(type_url: str, document: AnyType) -> any_pb2.Any:
    """An Any holding a JSON document, as containerd's typeurl does for Go structs."""
    return any_pb2.Any(type_url=type_url, value=json.dumps(document).encode())


def unpack_json(any_message: any_pb2.Any, expected_url: str | None = None) -> AnyType:
    """The JSON document inside an Any; `expected_url`, if given, must match its type_url."""
    if expected_url is not None and any_message.type_url != expected_url:
        raise UnknownTypeError(
            f"Any type_url is {any_message.type_url!r}, expected {expected_url!r}"
        )
    try:
        return json.loads(any_message.value)
    except ValueError as exc:
        raise ValueError(f"Any {any_message.type_url!r}: value is not JSON: {exc}") from None


def _message_class(name: str) -> type:
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName(name)
    except KeyError:
        _import_generated_modules()
        try:
            descriptor = pool.FindMessageTypeByName(name)
        except KeyError:
            raise UnknownTypeError(f"Any type_url names unknown message type {name!r}") from None
    return message_factory.GetMessageClass(descriptor)


_generated_imported = False


def _import_generated_modules() -> None:
    """Import every api.gen *_pb2 module, so their types are in the descriptor pool."""
    global _generated_imported
    if _generated_imported:
        return
    import api.gen

    for module in pkgutil.walk_packages(api.gen.__path__, "api.gen."):
        if module.name.endswith("_pb2"):
            importlib.import_module(module.name)
    _generated_imported = True
