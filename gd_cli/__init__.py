"""The ``gd`` application: the command line, the demo, corpus handling, plots and the
loss-landscape diagnostic, built on :mod:`gd_core` and the framework adapters (:mod:`adapters`).

The library is :mod:`gd_core` plus one adapter per framework; this package is an application of
it (``adapters`` never imports ``gd_cli``). Importing a module here imports no framework: each
command imports what it needs when it runs, and a missing framework ends in one line naming the
extra to install.

Modules:

* :mod:`gd_cli.main` -- the parser and :func:`gd_cli.main.main` (the ``gd`` console script);
* :mod:`gd_cli.commands` -- one module per sub-command, imported explicitly by the parser;
* :mod:`gd_cli.args`, :mod:`gd_cli.distributed`, :mod:`gd_cli.text` -- argparse helpers, the
  ``torchrun`` set-up, and the text -> batches -> loss pipeline the commands share;
* :mod:`gd_cli.corpus` -- reading and choosing paragraphs, tokenising, text models and losses;
* :mod:`gd_cli.models` -- the bundled MiniLM, the training-mode ONNX export recipe, the Keras
  BERT replica;
* :mod:`gd_cli.demo`, :mod:`gd_cli.plots`, :mod:`gd_cli.landscape`.
"""
