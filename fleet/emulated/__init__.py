"""EMULATED services: local stand-ins for external endpoints, for tests, the demo and ops drills.

Everything here says it is emulated (in its docstrings, logs and responses); nothing
here is used on a production path.
"""
