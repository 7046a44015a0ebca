"""Turning sign videos into H&HT TFRecords (and the synthetic smoke dataset)."""

from signnet_jax.files import quiet_interrupt_while_starting

# `python -m data_prep.X`: a Ctrl-C during the command's imports is one line, not a traceback
quiet_interrupt_while_starting()
