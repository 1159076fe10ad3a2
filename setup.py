from setuptools import setup

setup(cffi_modules=["flashlite/_build.py:ffi"])
