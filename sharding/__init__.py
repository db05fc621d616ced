"""SSv2 and WebDataset shards, nothing about models: make_shards (the packer), synthetic (an SSv2-format generator), storage (local folders and s3://), annotations, video."""
