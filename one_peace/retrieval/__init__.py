"""Retrieval: FAISS indexes over embedding folders written by ``python -m one_peace.embed``, and search.

``open_index(DIR).search(text="a dog barking", top_k=10)`` embeds the query with the model recorded in the
folder's ``info.json`` and returns the nearest items with their metadata. Needs the ``retrieval`` extra.
"""

from __future__ import annotations

from one_peace.retrieval.store import EmbeddingStore, Hit, RetrievalIndex, open_index

__all__ = ["EmbeddingStore", "Hit", "RetrievalIndex", "open_index"]
