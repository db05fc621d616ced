"""Tests on CPU: real SeaweedFS S3 server, real multi-process DeepSpeed on gloo, random weights."""
