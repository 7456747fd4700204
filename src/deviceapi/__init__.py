"""deviceapi: a node-local GPU device-state server on a trio actor runtime."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deviceapi")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
