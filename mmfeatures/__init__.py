"""mmfeatures: a batch Apache Beam pipeline that turns multimodal records into Parquet feature tables."""

__version__ = "0.1.0"
