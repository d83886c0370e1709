"""What every model shares: the layer table. A job's own models live in its package
(training/jobs/resnet/classifier.py, training/jobs/lm/wordlm.py)."""
