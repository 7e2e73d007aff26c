"""Kafka adapter: the only place (with devstack) that imports confluent_kafka.

Services reach the log through the driver-free port in :mod:`.port`; :mod:`.kafka`
implements it on a real cluster, :mod:`.memory` in memory for unit tests.
"""
