"""Multiple-choice evaluation of vision-language models on PathMMU-style questions (PathGen-LLaVA and baselines):
a validated JSON Lines dataset, one prompt, a strict reply parser, and per-subset accuracy reports."""
