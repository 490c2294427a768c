"""Captum Insights tests: run only where captum 0.8.0 (with Insights) is installed."""
