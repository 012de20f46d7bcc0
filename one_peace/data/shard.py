"""``python -m one_peace.data.shard MANIFEST OUT_DIR --shard-size N``: write WebDataset shards from a manifest."""

from one_peace.data.shards import main

if __name__ == "__main__":
    raise SystemExit(main())
