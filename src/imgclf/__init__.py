"""imgclf: a folder of labelled images in, a trained, evaluated and deployable image classifier out."""

import warnings

__version__ = "0.1.0"

# Pillow warns about images above its pixel limit; every imgclf reader checks the pixel count against its own
# limit (max_image_pixels) instead. Set once here, not per call: warnings.catch_warnings is not thread-safe,
# and images are decoded in threads, where a per-call context drops filters that other code set meanwhile.
# Appended: a filter of the program's own (such as "error", Pillow's advice against decompression bombs) still
# decides, whenever it was set.
warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit", module=r"PIL\.Image", append=True)
