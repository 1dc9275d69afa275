"""Data for sinus-wkd: the dataset-folder contract, the split, preprocessing, deterministic batches
and augmentation, and the procedural panoramic phantom that is the embedded default dataset.

This folder is also the default dataset root: `--data data/` generates the phantom here
(images/, masks/, phantom.json; git-ignored) on first use.
"""
from .augment import Corruption, Geometry, Photometric, augment_geometry, augment_photometric, batch_indices, \
    corrupt, derive_seed, labeled_batch, step_generator, strengths, unlabeled_views
from .classes import Classes, dataset_classes, from_record, observed
from .dataset import Dataset, list_images, load_tensors, prepare_dataset
from .split import SPLIT_KEYS, describe_split, inherited_split, new_split, resolve_split

__all__ = ["prepare_dataset", "Dataset", "list_images", "load_tensors", "Classes", "dataset_classes",
           "from_record", "observed", "SPLIT_KEYS", "describe_split", "new_split", "inherited_split", "resolve_split",
           "Geometry", "Photometric", "Corruption", "strengths", "corrupt", "batch_indices", "step_generator",
           "derive_seed", "augment_geometry", "augment_photometric", "labeled_batch", "unlabeled_views"]
