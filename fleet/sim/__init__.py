"""Trace-driven fleet simulation: traces, generators, the discrete-event engine, the lower bound."""
