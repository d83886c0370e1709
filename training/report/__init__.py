"""`dlops report`: the write-up of a set of runs, generated from what MLflow recorded."""
