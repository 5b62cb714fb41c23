"""Providers: who buys and releases instances. ``base`` holds the contract."""
