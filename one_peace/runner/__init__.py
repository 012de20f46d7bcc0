"""The parts behind ``python -m one_peace.run``: typed config, building tasks and loaders, distributed set-up,
evaluation and outputs. :mod:`one_peace.run` is the thin command line over them."""
