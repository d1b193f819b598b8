"""The dataset pipeline: corpus sources -> decoded, bucketed clips -> cached latents and text
embeddings -> training batches.

    data.config    DataConfig / SourceConfig: the `data:` section of a recipe
    data.sources   folders with captions, csv/jsonl manifests, saved HF datasets
    data.decode    probing, frame sampling (head/uniform/chunk/slide), fps resampling, resize+crop
    data.buckets   aspect buckets on a 16 px grid at target areas
    data.plan      scan(cfg) -> Plan: every clip's reason, buckets and windows
    data.report    format_report(plan): the dataset report
    data.cache     build_cache(plan, encoders, i2v, ...), cache_settings, verify_cache
    data.dataset   CachedDataset, BucketBatchSampler, collate

Modules are imported where used, so `import data` stays cheap.
"""
