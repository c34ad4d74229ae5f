"""The curation stages, one per file, each a plain callable class with its Ray resources declared beside it."""
