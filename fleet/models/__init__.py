"""The model registry: which models fleet serves, where their weights are, how to run them.

``fleet.models.registry`` is pure data (entries, aliases, validation); ``fleet.models.weights``
resolves an entry's weights to a local directory (fetching an object-store URI once into the
cache); ``fleet.models.tinyllama`` builds the small Llama-architecture test model.
"""
