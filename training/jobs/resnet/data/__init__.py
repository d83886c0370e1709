"""The classifier's data: image datasets on disk (Tiny-ImageNet's layout, ImageFolders), their
decoded cache, and the pipelines that batch them for training."""
