r"""Handwriting sequence generation with the HM-LSTM (§4.2 of the paper).

    python -m experiments.handwriting --flagfile=handwriting_demo.flags   # synthetic, CPU
    python -m experiments.handwriting --flagfile=handwriting.flags        # IAM-OnDB

Flagfiles by bare name are looked up in ``experiments/flags/``. Every flag is a field of
:class:`hmlstm_jax.handwriting.experiment.Config`; the experiment is
:class:`hmlstm_jax.handwriting.experiment.Handwriting`.
"""
import os

from hmlstm_jax.handwriting import experiment
from hmlstm_jax.training import cli

FLAGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")

if __name__ == "__main__":
  cli.run_binary("handwriting", experiment.Config, experiment.Handwriting, FLAGS_DIR,
                 experiment.default_workdir)
