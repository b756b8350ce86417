"""Data: image loading, caption manifests and data sets, the demo data builder."""
