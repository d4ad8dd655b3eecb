"""Hand-off to serving: Triton model repositories, DeepStream tracker ReID configs, and the
preprocessing of those deployments (so the verifier can measure what they cost)."""
