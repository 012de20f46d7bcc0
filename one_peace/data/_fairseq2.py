"""Import fairseq2's data pipeline, first loading the libsndfile bundled with the soundfile wheel.

fairseq2n needs ``libsndfile.so.1`` at import time; a fresh machine lacks the system package, but soundfile's
wheel ships the same library (SONAME ``libsndfile.so.1``). Loading it with ``RTLD_GLOBAL`` first satisfies
fairseq2n, so users need no system package (``apt-get install libsndfile1`` remains a fallback).
"""

from __future__ import annotations

import ctypes
import glob
import os
from types import ModuleType


def _preload_libsndfile() -> None:
    import soundfile

    folder = os.path.join(os.path.dirname(soundfile.__file__), "_soundfile_data")
    for path in sorted(glob.glob(os.path.join(folder, "libsndfile*.so*"))):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def data_pipeline() -> ModuleType:
    """``fairseq2.data.data_pipeline``, importable without a system libsndfile.

    Raises:
        MissingExtraError: fairseq2 (the ``train`` extra) is not installed.
    """
    from one_peace.extras import require

    require("train", "fairseq2", feature="the training data pipeline (one_peace.data.MultimodalLoader)")
    _preload_libsndfile()
    import fairseq2.data.data_pipeline as dp

    return dp
