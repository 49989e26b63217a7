"""The frozen program's entry point: the same CLI as the ``tabagent-server`` console script.

The binary is also its own ML worker (``tabagent-server ml-service``) and native-messaging host.
The worker goes straight to :mod:`ml_service`: importing the server's CLI first would cost it a
second at every start; everything else goes through :func:`tabagent.cli.main`.
"""

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a library's multiprocessing child must not rerun the CLI
    if sys.argv[1:2] == ["ml-service"]:
        from ml_service.server import main as worker_main

        worker_main(sys.argv[2:])
    else:
        from tabagent.cli import main

        main()
