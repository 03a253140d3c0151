"""Integrations of tokprune into serving stacks (vLLM, SGLang). Each submodule imports its stack lazily;
importing :mod:`tokprune.integrations` itself needs nothing beyond tokprune."""
