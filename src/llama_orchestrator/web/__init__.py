"""The web dashboard's files (``static/``), served by the daemon under ``/ui/`` (``api.web``). No build step."""
