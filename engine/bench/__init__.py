"""Speed benchmarks on real-size random-weight models."""
