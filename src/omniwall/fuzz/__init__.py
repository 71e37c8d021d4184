"""Differential fuzzing of the data plane: random policies judged by the kernel and by the sim must agree.

`generate`: random but valid resource sets from a seed. `cases`: what is probed. `compare`: when a
kernel answer and a sim verdict agree. `runner`: one lab, programmed round after round, probed and
compared. `campaign`: labs from consecutive seeds until N probes. `python -m omniwall.fuzz --probes N`
(docs/design/differential.md).
"""
