"""transrec.models."""
