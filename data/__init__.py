"""Data for sinus-wkd: the dataset-folder contract, preprocessing, deterministic batches and
augmentation, and the procedural panoramic phantom that is the embedded default dataset.

This folder is also the default dataset root: `--data data/` generates the phantom here
(images/, masks/, phantom.json; git-ignored) on first use.
"""
from .augment import augment_geometry, augment_photometric, batch_indices, step_generator
from .dataset import load_case, load_tensors, prepare_dataset, resolve_split

__all__ = ["prepare_dataset", "resolve_split", "load_case", "load_tensors", "batch_indices",
           "step_generator", "augment_geometry", "augment_photometric"]
