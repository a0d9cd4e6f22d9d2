"""Shared fixtures. Tests run on the CPU with small shapes."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/numpy_reference.py
