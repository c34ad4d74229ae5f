"""Data curation on Ray Data: raw videos in, webdataset shards + manifest out (see DESIGN.md "Dataset format")."""
