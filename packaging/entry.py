"""The frozen program's entry point: the same CLI as the ``tabagent-server`` console script.

The binary is also its own ML worker (``tabagent-server ml-service``) and native-messaging host,
so everything goes through :func:`tabagent.cli.main`.
"""

import multiprocessing

from tabagent.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a library's multiprocessing child must not rerun the CLI
    main()
