"""Run machinery: command-line flags, run directories, torchrun, logs, loading a model by name.

Nothing here is the method: model.py, lofit.py and adapter.py never import it. Skip it on a first read.
"""
