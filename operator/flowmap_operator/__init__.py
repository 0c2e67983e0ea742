"""The operator: turns agents' reports into Group and Connection resources."""
