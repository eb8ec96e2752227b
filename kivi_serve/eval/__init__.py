"""Accuracy evaluation: text corpora and the perplexity harness for the KV-cache formats."""
