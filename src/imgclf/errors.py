"""Errors that mean "the input or the setup is wrong": the CLI prints their message instead of a traceback."""

from imgclf.backbones.factory import BackboneError
from imgclf.bundle import BundleError
from imgclf.data.dataset import DatasetError
from imgclf.data.io import ImageError
from imgclf.features.runtimes import DeviceError
from imgclf.utils import FolderInUse

USER_ERRORS: tuple[type[Exception], ...] = (
    BackboneError,
    BundleError,
    DatasetError,
    DeviceError,
    FolderInUse,
    ImageError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    KeyError,
    ValueError,
)
