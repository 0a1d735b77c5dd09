"""Child brokers: an async function run in a child process with a bus of its own, linked to the parent.

Nothing is imported here: the parent's side (``parent``) and the worker's (``child``) each load
only their own modules; the names are exported by :mod:`aiobus`.
"""
