"""The describe, revise and summarize agents and their model backends (the caption issue builds them)."""
