"""The memory layer: seven databases under the db path, searched together.

``Memory`` (``tabagent.storage.memory``) opens them all and is the in-process database client;
``tabagent.storage.client`` reaches the same interface in another process over gRPC.
"""
