"""transrec.engine."""
