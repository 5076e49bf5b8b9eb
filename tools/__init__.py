"""Research tools over finished runs: report, ablate, reproduce, audit_judge, and what only they use."""
