"""The public import path of the clients for web apps: `from producer.client import EmbedClient`.

The code lives in producer/serve/ (client.py, async_client.py); this module only names it.
"""

from producer.serve.async_client import AsyncEmbedClient
from producer.serve.client import EmbedClient
from workers.protocol.errors import ModelNotServed

__all__ = ["AsyncEmbedClient", "EmbedClient", "ModelNotServed"]
