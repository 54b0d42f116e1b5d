r"""Data sets: arrays of samples as tensors. This package knows nothing of flows."""

from .images import IMAGE_DATASETS, ImageDataset, cifar10, digits, fashion_mnist, image_dataset, mnist
from .splits import DATA_ALIASES, DATA_NAMES, DataSplits, load_data
from .tabular import SUPPORTED_SUFFIXES, Standardizer, check_columns, column_names, load_tabular
from .toy import (
    TOY_DATASETS,
    checkerboard,
    circles,
    eight_gaussians,
    pinwheel,
    toy_dataset,
    two_moons,
    two_spirals,
)

__all__ = [
    "TOY_DATASETS",
    "toy_dataset",
    "two_moons",
    "circles",
    "eight_gaussians",
    "checkerboard",
    "pinwheel",
    "two_spirals",
    "IMAGE_DATASETS",
    "ImageDataset",
    "image_dataset",
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "SUPPORTED_SUFFIXES",
    "Standardizer",
    "load_tabular",
    "check_columns",
    "column_names",
    "DATA_ALIASES",
    "DATA_NAMES",
    "DataSplits",
    "load_data",
]
