"""Quality evaluations run by ``tokprune eval FAMILY`` (real weights, held-out text)."""
