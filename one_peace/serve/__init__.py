"""A local search page over embedding folders: ``python -m one_peace.serve index=DIR [index=DIR2 ...]``.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart). See docs/RETRIEVAL.md.
"""

from __future__ import annotations

from one_peace.serve.service import QueryError, SearchService

__all__ = ["QueryError", "SearchService"]
