"""Packaging (.mar) and TorchServe control for the models that `training` produces."""
