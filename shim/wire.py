"""The few protobuf encodings the shim's fast paths write and read by hand.

`start` and `delete` run once per container while containerd waits; importing protobuf
would cost them more than everything else they do. Tests check these against the
generated protobuf classes.
"""


class WireError(ValueError):
    pass


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    if not value:
        return b""  # proto3 leaves zero values out
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint((number << 3) | 2) + varint(len(value)) + value


def length_delimited_fields(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a message (last one wins); other wire types skipped."""
    return dict(all_length_delimited_fields(data))


def all_length_delimited_fields(data: bytes) -> list[tuple[int, bytes]]:
    """Every length-delimited field of a message in order, repeated ones each time."""
    fields: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, i = _read_varint(data, i)
        elif wire_type == 2:
            length, i = _read_varint(data, i)
            if i + length > len(data):
                raise WireError("truncated protobuf")
            fields.append((number, data[i : i + length]))
            i += length
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        else:
            raise WireError(f"unsupported protobuf wire type {wire_type}")
    if i > len(data):
        raise WireError("truncated protobuf")
    return fields


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise WireError("truncated protobuf")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
