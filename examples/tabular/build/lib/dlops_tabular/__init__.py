"""An example dlops job: an MLP classifier for the rows of your own CSV table (docs/jobs.md)."""
