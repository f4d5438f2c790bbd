"""Data: preprocessing, templates/tokenization, datasets, collate, pipelines."""
