"""`imedsam serve`: a web page for interactive segmentation on a bounded HTTP API.

Layout (one job per module):

* :mod:`.settings` the server's typed settings (limits, budgets, token);
* :mod:`.uploads` an upload -> a :class:`~imedsam.io.sample.Sample`, through the same readers as the CLI;
* :mod:`.cache` the embedding cache: LRU under a memory budget, computed at most once at a time per key;
* :mod:`.gate` at most N inferences at once, a bounded queue, 503 beyond it;
* :mod:`.models` the models and trained runs the server offers (never a path from the client);
* :mod:`.sessions` an opened image or volume with its label map, objects and undo;
* :mod:`.app` the FastAPI application (JSON API under ``/api``, OpenAPI at ``/docs``, the page at ``/``);
* ``static/`` the page, vendored (no CDN).
"""

from imedsam.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def create_app(settings: ServeSettings | None = None, **kwargs):
    """The ASGI application (see :func:`imedsam.serve.app.create_app`)."""
    from imedsam.serve.app import create_app as _create

    return _create(settings, **kwargs)
