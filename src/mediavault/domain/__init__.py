"""Business rules as plain async functions over an asyncpg pool.

Shared by the gRPC servicers, the arq workers and the CLI. Nothing here imports
grpc or the generated protos; correctness under concurrency is decided by
PostgreSQL (CHECK constraints, unique keys, row locks), never by a Python check.
"""
