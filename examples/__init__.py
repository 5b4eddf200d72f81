"""Example dq applications."""
