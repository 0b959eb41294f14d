"""Model locations beyond the local disk (issue #16): s3://, hf:// and https:// stores read by
listing and range reads, never by a full download unless a check needs every byte."""
