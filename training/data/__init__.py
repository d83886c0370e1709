"""What every job's data shares: the error for bad input data. A job's own datasets live in its package
(training/jobs/resnet/data/, training/jobs/lm/corpus.py)."""

import os

LOADER_WORKERS = min(4, os.cpu_count() or 1)  # DataLoader processes reading files, unless -j says otherwise
