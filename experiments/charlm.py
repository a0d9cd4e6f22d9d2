r"""Character-level language modelling with the HM-LSTM (§4.1 of the paper).

    python -m experiments.charlm --flagfile=demo.flags            # workdir: workdirs/demo
    python -m experiments.charlm --flagfile=text8.flags --workdir=/data/runs/text8

A ``--flagfile`` given by bare name is looked up in ``experiments/flags/`` when it is not a
path that exists; flags after the flagfile override it. The run resumes from the last
checkpoint in ``--workdir``. Every flag is a field of
:class:`hmlstm_jax.charlm.experiment.Config`; the experiment is
:class:`hmlstm_jax.charlm.experiment.CharLM`.
"""
import os

from hmlstm_jax.charlm import experiment
from hmlstm_jax.training import cli

FLAGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")

if __name__ == "__main__":
  cli.run_binary("charlm", experiment.Config, experiment.CharLM, FLAGS_DIR,
                 experiment.default_workdir)
