"""Serve an index over HTTP: the FastAPI app (``POST /search``, ``GET /images/{id}``, ``/info``) and the web page.

The package sits above ``search`` and ``report`` (it queries an index and reads the run it came from) and
below ``cli`` (``cliptune serve`` only parses flags and starts uvicorn). See ``docs/serve.md``.
"""
