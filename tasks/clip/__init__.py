"""PathGen-CLIP: export pairs as WebDataset tars, train with open_clip_train, evaluate checkpoints."""
