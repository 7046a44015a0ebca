"""SignNet in JAX/Flax: H&HT preprocessing and a VideoMAEv2 video ViT."""

from signnet_jax.files import quiet_interrupt_while_starting

# `python -m signnet_jax.X`: a Ctrl-C during the command's imports is one line, not a traceback
quiet_interrupt_while_starting()
