"""Broker implementations: `dq.brokers.stub` (in memory) for now."""
