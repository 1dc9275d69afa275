"""Run plumbing shared by every stage: errors, seeding, logging, checkpoints."""
