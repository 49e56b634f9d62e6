"""imgclf: a folder of labelled images in, a trained, evaluated and deployable image classifier out."""

__version__ = "0.1.0"
