"""Developer tools: ahead-of-time GPU compile checks (``python -m tokprune.tools.aot``)."""
