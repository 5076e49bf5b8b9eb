"""Dataset preparation: one folder per dataset, each with a prepare.py that writes mcq records as JSONL."""
