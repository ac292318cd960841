"""Asks CUDA a question at import, as some libraries do: torch then flags every fork of this
process as one where CUDA cannot work (there is no GPU here, and the flag is set all the same)."""

import torch

torch.cuda.device_count()
