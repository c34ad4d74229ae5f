"""Training on Ray Train + DeepSpeed: the audio branch of MultiTalk over the curated shards."""
