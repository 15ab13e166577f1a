"""Versioned data contracts of mmfeatures, declared once as JSON and loaded by the code and tests."""
