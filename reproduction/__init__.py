"""What reproduce.py runs (plan.py) and how it turns the runs' results into the tables (tables.py)."""
