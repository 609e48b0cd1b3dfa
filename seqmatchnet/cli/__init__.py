"""The command line: the mode table (``modes.py``), the shared options (``options.py``), the one
entry shell (``entry.py``, ``shared.py``) and one module per mode, each with ``main(argv)``.
"""
