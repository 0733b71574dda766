"""``python -m data_prep``: an alias of ``dlightning shards`` (offline shard building, :mod:`dlightning.shards`)."""
