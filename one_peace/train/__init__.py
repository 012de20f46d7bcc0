"""Training side: masking policies and objectives (the trainer, tasks and recipes build on these).

Not imported by :mod:`one_peace`: encoding embeddings needs none of it.
"""
