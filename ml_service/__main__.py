"""``python -m ml_service`` (development); the frozen binary runs ``tabagent-server ml-service``."""

from ml_service.server import main

main()
