"""`llama-orch dashboard`: the Textual front end (app, screens) over ``tui.data``, which does the blocking work."""
