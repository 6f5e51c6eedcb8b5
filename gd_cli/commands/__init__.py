"""The ``gd`` sub-commands, one module each.

Every module has ``add_parser(sub)``, which adds its parser to the ``gd`` sub-parsers and sets
``run`` as what the command does. :mod:`gd_cli.main` imports each of them by name; importing one
imports no framework (the command does, when it runs).
"""
