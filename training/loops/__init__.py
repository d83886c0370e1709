"""What every epoch loop shares: stop and checkpoint requests within an epoch, and its progress line. A
job's own loops live in its package (training/jobs/resnet/loop.py, training/jobs/lm/loop.py)."""
