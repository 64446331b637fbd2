"""The task engine: tasks, threads, event loops, cancellation, events, captured output.

Nothing here imports IPython, ipykernel, ipywidgets or zmq (checked by import-linter).
"""
