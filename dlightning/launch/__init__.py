"""Launching runs: the ``launch`` config section (:mod:`.config`), the sbatch template and its
renderer (:mod:`.sbatch`), and the torchrun script for clusters without SLURM."""
