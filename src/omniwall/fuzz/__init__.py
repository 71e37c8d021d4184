"""Differential fuzzing of the data plane: random policies judged by the kernel and by the sim must agree.

`generate`: random but valid resource sets from a seed. `runner`: bring up a lab, program it round after
round, probe, compare with the sim. `python -m omniwall.fuzz --probes N` (docs/design/differential.md).
"""
