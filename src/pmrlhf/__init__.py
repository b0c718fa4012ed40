"""pmrlhf: preference-matching RLHF (Xiao et al., arXiv 2405.16455)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pmrlhf")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"
