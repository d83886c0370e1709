"""Releasing trained models: packaging checkpoints as TorchServe archives and deploying them to a
running server. It stands above both `training` (it reads checkpoints and job declarations) and
`serving` (it drives a server through its runtime), and imports from both; neither imports it."""
