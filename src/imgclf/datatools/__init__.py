"""Building a data set: downloading URL lists, image search (scrape) and near-duplicate detection (dedup)."""
