"""Framework adapters, installed as ``esswatch.integrations``.

Each submodule imports its framework lazily, on first use; ``import esswatch``
never imports lightning or transformers.
"""
