"""What the platform's entry points share (curation, training, serving, evaluation): run configs, connecting to
Ray, atomic file writes. multitalk_model imports none of it."""
