"""The shared base: records, the data layer and the metrics registry. Imports no torch and no Ray at import."""
