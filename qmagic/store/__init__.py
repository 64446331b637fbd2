"""What qmagic keeps on disk: the environment lock and the experiment log.

Nothing here imports IPython, ipykernel, ipywidgets or zmq (checked by import-linter).
"""
