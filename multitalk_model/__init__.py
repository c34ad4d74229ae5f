"""MultiTalk: audio-driven multi-person conversational video generation on Wan2.1-I2V.

The model and single-machine generation: pure PyTorch + diffusers + transformers, no Ray.
"""
