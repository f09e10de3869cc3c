"""Loading logged data from outside the app into its schema (the Open Bandit Dataset first)."""
