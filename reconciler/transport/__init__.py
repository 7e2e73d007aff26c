"""Kafka adapter: the only place (with devstack) that imports confluent_kafka."""
