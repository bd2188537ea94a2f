"""Images: the catalog, the store of files, inspection, copies on nodes, their locks, transfers."""
