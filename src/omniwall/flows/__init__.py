"""Flow records: every verdict at every hop, attributed to the rule (or tenant default) that decided it.

`record.py` is the wire contract between agents (producers) and the manager (ingest, storage, API).
"""
