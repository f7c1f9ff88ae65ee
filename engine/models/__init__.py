"""What the engine knows about each model family (FIS adapter, SP plan, pipeline differences)."""
