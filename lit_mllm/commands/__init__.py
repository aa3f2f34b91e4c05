"""One module per ``lit-mllm`` subcommand, each with a ``main(args)``; :mod:`lit_mllm.cli` names them in its table
and imports only the one that runs. Nothing else in ``lit_mllm`` imports this package.

Attribute docstrings (dataclass fields such as ``Stage.trainable``, ``ShapesWorld.min_object_px``) become the
``--help`` text of every command parsed by jsonargparse; that setting is made here, once, when a command is
imported.
"""

try:
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
except ImportError:  # jsonargparse < 4.35
    from jsonargparse import set_docstring_parse_options

    set_docstring_parse_options(attribute_docstrings=True)
