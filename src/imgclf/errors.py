"""Errors that mean "the input or the setup is wrong": the CLI prints their message instead of a traceback."""

from imgclf.backbones.factory import BackboneError
from imgclf.data.dataset import DatasetError
from imgclf.data.io import ImageError

USER_ERRORS: tuple[type[Exception], ...] = (
    BackboneError,
    DatasetError,
    ImageError,
    FileNotFoundError,
    FileExistsError,
    KeyError,
    ValueError,
)
