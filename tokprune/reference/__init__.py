"""Plain-torch oracles of every op, written for clarity; tests compare the backends against them.

The ``torch`` backend of an op may call its oracle directly when the oracle is already vectorised.
"""
