"""Model definitions, written for one device; TP comes from the layers' sharding."""
