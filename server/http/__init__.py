"""The HTTP layer: the listener, the URL table, handlers, request parsing and errors."""
