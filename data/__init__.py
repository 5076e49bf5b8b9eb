"""Dataset preparation: one folder per dataset, each with a prepare.py that writes records
(pathvlm/records.py) as JSONL."""
