"""Tools: the commands ``aiba eval``, ``report``, ``diagnose``, ``demo`` and ``bench``.

Each module registers one sub-command with :mod:`aiba.cli` and is thin over the layers
below: capture -> maps -> align, the run directory, :mod:`aiba.data` and the backends.
"""
