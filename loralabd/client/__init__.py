"""Python client for loralabd: async (AsyncClient) and sync (Client), over the websocket or stdio.

    async with await AsyncClient.connect() as c:          # finds the running daemon or starts one
        m = await c.request("model/load", {})
        async for ev in (s := c.stream("generate", {"model": m["id"], "messages": [...]})):
            print(ev["text"], end="")
        result = await s.result()
"""

from .core import AsyncClient, Client, RpcError, Stream, start_daemon

__all__ = ["AsyncClient", "Client", "RpcError", "Stream", "start_daemon"]
