"""ttrpc for Python: containerd's RPC protocol over unix sockets (asyncio).

Public API: `Server`, `Client`, `Context`, `TtrpcError`, `Code`, `listen`,
`MAX_MESSAGE_SIZE`. Typed service bases and clients are generated next to the message
modules (`api.gen.<path>_ttrpc`). Importing this package stays cheap (asyncio and
protobuf only) because the shim's `start` path pays for it on every container.
"""

from api.ttrpc.address import listen
from api.ttrpc.client import Client
from api.ttrpc.codes import Code
from api.ttrpc.errors import TtrpcError, error_from_exception
from api.ttrpc.framing import MAX_MESSAGE_SIZE
from api.ttrpc.server import Context, Server

__all__ = [
    "MAX_MESSAGE_SIZE",
    "Client",
    "Code",
    "Context",
    "Server",
    "TtrpcError",
    "error_from_exception",
    "listen",
]
