"""Data sets: text (TFDS, bytes as tokens), the project's TFDS builders, and image data sets."""
