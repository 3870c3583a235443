"""Conversations kept on the server: the owner change feed, the answer writer, titles."""
