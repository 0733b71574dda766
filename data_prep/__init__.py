"""Offline shard building for dlightning: ``python -m data_prep {build,verify,demo}``.

A thin front end over ``dlightning.data`` (sources, degradation, shard writing, manifest).
"""
