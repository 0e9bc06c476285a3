"""Host side of the public collectives: validation, path choice and launch."""
