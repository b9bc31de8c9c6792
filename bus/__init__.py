"""The Redis Streams bus: connection, key names, streams, blobs, registry, embedded server.

Uses `serialization`; nothing else of ours.
"""
