"""What a ResNet run logs besides the trainer's own metrics (training/metrics.py), named once."""

from __future__ import annotations

from training.metrics import Metric

ACC1 = Metric(name="val/acc1", label="val Acc@1 (%)", higher_is_better=True)
ACC5 = Metric(name="val/acc5", label="val Acc@5 (%)", higher_is_better=True)
TRAIN_ACC1, TRAIN_ACC5 = "train/acc1", "train/acc5"
IMAGES_PER_SECOND, DATA_WAIT_SHARE = "time/images_per_second", "time/data_wait_share"
