"""transrec.shards."""
