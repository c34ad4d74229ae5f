"""MultiTalk: audio-driven multi-person conversational video generation on Wan2.1-I2V.

The model and single-machine generation: pure PyTorch + diffusers + transformers, no Ray.
"""

from .import_noise import quiet_torchao_import

quiet_torchao_import()  # before any of our modules imports diffusers (which imports torchao)
