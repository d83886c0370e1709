"""dlops: tracked training, evaluation and packaging of a ResNet and a word-level LM."""

__version__ = "0.1.0"
