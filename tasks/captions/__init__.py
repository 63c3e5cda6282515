"""captions stage."""
