"""Training side: masking policies, objectives, tasks and the trainer.

Not imported by :mod:`one_peace`: encoding embeddings needs none of it. Everything here runs on the core install;
only the streaming data loader (:mod:`one_peace.data.loader`) needs the ``train`` extra (fairseq2), and the
trainer accepts any :class:`one_peace.train.batches.BatchSource` (e.g. a :class:`~one_peace.train.batches.BatchList`).
"""
