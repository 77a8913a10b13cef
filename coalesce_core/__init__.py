"""coalesce: fault-tolerant, snapshot-coalescing replication of qtrees.

The names follow the patent application this project implements (README.md):
a PCPI is a persistent consistency point image (a snapshot); the coalesced
base is the one PCPI every replica in the cycle exports; jump-ahead is the
two-step procedure (branch 1032) that moves the whole group to a new base.
"""

__version__ = "0.1.0"
