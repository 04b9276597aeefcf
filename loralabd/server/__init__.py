"""The daemon: JSON-RPC dispatch (handlers), model manager, transports (stdio, websocket), entry point."""
