"""The only package that imports Ray: Data pipelines, Train and Tune wiring, the rate limiter."""
