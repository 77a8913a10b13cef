"""The change stream: records, their wire codec, the spool that holds a stream, content fingerprints."""
