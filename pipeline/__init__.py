"""From image files in object storage to SA-1B-style masks."""
