"""Runnable examples a user would copy; small models they use live in examples/models/."""
