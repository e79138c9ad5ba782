"""Run as ``python -m tests.code.pool_owner``: a pool used from a module run with -m, as a deployment's
``python -m prefect.engine`` does. Prints one worker's pid."""

import os

from pneumo.pool import ProcessPool, warm_up

if __name__ == "__main__":
    warm_up()
    with ProcessPool(1) as pool:
        print(pool.run(os.getpid))
