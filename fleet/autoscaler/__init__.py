"""The autoscaler: observe (I/O) -> plan (pure) -> act (through a provider).

``model`` holds the data that flows between the steps; ``config`` the validated TOML;
``planner`` the pure decision; ``observe``, ``actuator`` and ``loop`` the thin I/O.
"""
