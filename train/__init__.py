"""Training: ``accelerate launch train/run.py --method crw|dino --data DIR --out RUN``."""
