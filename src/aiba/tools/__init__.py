"""Tools: the commands ``aiba eval``, ``report`` (and its figures), ``diagnose``, ``demo``,
``bench`` and ``train-reference``, and the reference model's positive control.

In: command-line settings. Out: run directories, tables, figures, diagnoses and benchmark
files. Each command module registers one sub-command with :mod:`aiba.cli` and is thin over
the layers below: capture -> maps -> align, the run directory (:mod:`aiba.runs`),
:mod:`aiba.data` and the backends. Nothing below imports a tool.
"""
