"""``python -m aiobus``: the ``aiobus`` command.

The guard matters: child brokers run in ``anyio.to_process`` workers, which import
the parent's main module (this file) again.
"""

from aiobus._cli import main as main  # absolute: the workers load this file outside its package

if __name__ == "__main__":
    main()
