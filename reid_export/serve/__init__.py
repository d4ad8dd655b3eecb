"""Hand-off to serving and trackers: Triton model repositories (``triton``), DeepStream tracker ReID
configs (``deepstream``), BoxMOT's ONNX/OpenVINO files and sidecars (``boxmot``), and ``fold``: a
client's input convention (pixel scale, mean/std, channel order) folded into the graph. What those
deployments' preprocessing costs is measured by ``verify`` (``eval``/``parity --deployment``)."""
